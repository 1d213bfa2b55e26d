"""Random-weight models built from configs for tests and benchmarks; nothing in the core imports it.

``architectures``  the tiny, SD-1.5 and SD-2.1 architectures (UNet, VAE, text encoder, scheduler) and the
                   SD-1.x noise schedule (``SD1_SCHEDULER_CONFIG``).
``tiny``           tiny UNets, the SD-1.x DDIM scheduler, a saved tiny SD pipeline and tiny open_clip models.
"""
