"""Random-weight models built from configs for tests and benchmarks; nothing in the core imports it
(``testing`` may import ``shapes``, never the other way round: tests/test_import_graph.py checks it).

``architectures``  the tiny, SD-1.5 and SD-2.1 architectures (UNet, VAE, text encoder, scheduler) and the
                   SD-1.x noise schedule (``SD1_SCHEDULER_CONFIG``, spelt in ``shapes.schedule``).
``tiny``           tiny UNets, the SD-1.x DDIM scheduler, a saved tiny SD pipeline and tiny open_clip models.
``memory``         bytes autograd saves for a computation's backward (the memory-claims' measuring stick).
``flow_models``    SD3.5-medium / FLUX.1 transformers, VAEs and schedulers (real configs and tiny ones), and saved
                   tiny SD3 / FLUX pipelines (CLIP towers, T5 with an offline tokenizer).
``sana_models``, ``flux2_models``, ``qwen_image_models``  tiny SANA / SANA-Sprint, FLUX.2 klein and Qwen-Image
                   pipelines in their released layouts (offline Gemma / Qwen tokenizers).
``family_models``  SANA 1600M / SANA-Sprint 1.6B, FLUX.2 klein 4B and Qwen-Image by name (real configs, written in
                   the three modules above, and tiny ones), built through each family's backbone without a text encoder,
                   with random conditioning of its encoder's shape (the benchmarks' ``--sd-config``).
``families``       every family's tiny model by name (``TINY_MODELS``) and by pipeline class (``TINY_MODEL_OF``).
``adapters``       a tiny IP-Adapter (weights in diffusers' key layout + its CLIP image encoder) and standalone
                   ControlNets for several-at-once tests.
"""
