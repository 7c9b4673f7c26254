"""Using a trained run: the paper's test protocol with 1, 10 or 144 crops (``evaluate``,
``multi_crop``, ``crop_stream``), classifying image files (``predict``) and exporting a plain
model file (``export``), all from a run on disk (``run_files``); and torch.hub's entry points
(``hub``, called by ``hubconf.py`` at the repository root)."""
