"""The mlx-crepulse desktop app: offline creative exploration with varied batches of images.

Built on mlx_crepulse's public API only. One concept per file:
  __main__.py  command line, QApplication, the --screenshot mode
  worker.py    the engine thread that owns the model: jobs in, progress/previews/batches out
  history.py   every batch, image, star and recipe, in SQLite + PNG files (crash-safe ordering)
  refine.py    turning a favourite and an action (vary, explore, blend, upscale, rerun) into a job
  models.py    model choice, memory needs, downloading from the Hub on a thread
  controls.py  the generation form: prompt, model, batch size, diversity, advanced fold
  grid.py      a batch as a grid of tiles: previews, stars, keyboard
  viewer.py    full-size view and side-by-side comparison
  history_view.py  browsing past batches: filter, star, reload a recipe, export
  window.py    the main window tying these together
"""

APP_NAME = "mlx-crepulse"
ORG_NAME = "mlx-crepulse"
