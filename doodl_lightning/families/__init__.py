"""Model-family specifics (latent layouts, how a family's model is called), kept out of the
model-agnostic samplers.

``flow``         SD3 / SD3.5 and FLUX.1 behind the ``Backbone`` interface (``FlowBackbone``, ``PretrainedFlowBackbone``).
``flux_layout``  FLUX's 2x2 latent packing, position ids and velocity call.
"""
