"""gen_lifting: pose-free NeRF wrapped in a diffusion model, as a nerfstudio plugin.

Importing this package does not import nerfstudio; the nerfstudio-facing modules (model, pipeline,
datamanager, method configs) import it themselves.
"""
