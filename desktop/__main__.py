"""Start the app: `python -m desktop` or the installed `mlx-crepulse-app`.

    mlx-crepulse-app [--data-dir DIR] [--model SOURCE]
    mlx-crepulse-app --screenshot app.png --prompt "a red fox in the snow"

--screenshot generates one batch (on the demo model unless --model says otherwise), saves a PNG of
the main window and exits; its history goes to a temporary folder unless --data-dir is given.
"""

import argparse
import os
import sys
import tempfile


def parse(argv):
    p = argparse.ArgumentParser(prog="mlx-crepulse-app", description="Offline creative exploration with FLUX.1: "
                                "varied batches, favourites, refinement and history.")
    p.add_argument("--data-dir", help="where history and images live (default: the platform's app-data folder, "
                                      "or $MLX_CREPULSE_APP_DIR)")
    p.add_argument("--model", help="demo, schnell, dev, a Hub repo id or a model folder")
    p.add_argument("--screenshot", metavar="PATH", help="generate one batch, save a PNG of the window, exit")
    p.add_argument("--prompt", help="the prompt to put in the form (and generate, with --screenshot)")
    p.add_argument("-n", type=int, help="batch size")
    p.add_argument("--seed", type=int, help="batch seed (with --screenshot)")
    p.add_argument("--size", default="1240x820", help="window size WxH with --screenshot (default 1240x820)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before --screenshot gives up")
    return p.parse_args(argv)


def _no_display() -> bool:
    return sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.screenshot and _no_display():  # a screenshot needs no screen: Qt draws offscreen
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QCoreApplication, QSettings
    from PySide6.QtWidgets import QApplication

    from . import APP_NAME, ORG_NAME, worker
    from .window import STYLE, MainWindow, apply_theme

    QCoreApplication.setOrganizationName(ORG_NAME)
    QCoreApplication.setApplicationName(APP_NAME)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    apply_theme(app)
    app.setStyleSheet(STYLE)

    settings = None
    data_dir = args.data_dir
    tmp = None
    if args.screenshot:
        tmp = tempfile.TemporaryDirectory(prefix="crepulse-shot-")
        data_dir = data_dir or tmp.name
        settings = QSettings(f"{tmp.name}/settings.ini", QSettings.Format.IniFormat)  # leave preferences alone
    win = MainWindow(data_dir=data_dir, settings=settings)
    if args.model:
        win.form.set_source(args.model)
    elif args.screenshot:
        win.form.set_source("demo")
    if args.prompt:
        win.form.prompt.setPlainText(args.prompt)
    if args.n:
        win.form.n.setValue(args.n)
    if args.seed is not None:
        win.form.seed.setValue(args.seed)
    code = {"rc": 0}
    if args.screenshot:
        _screenshot(app, win, args, code)
    else:
        win.show()
    rc = app.exec()
    worker.shutdown()
    if tmp is not None:
        tmp.cleanup()
    return code["rc"] or rc


def _screenshot(app, win, args, code):
    """Generate one batch, save a PNG of the window, quit; code["rc"] says how it went."""
    from PySide6.QtCore import QTimer

    w, h = (int(v) for v in args.size.lower().split("x"))
    win.resize(w, h)

    def shoot(_=None):
        win.grid.setFocus()
        QTimer.singleShot(400, save)

    def save():
        if not win.grab().save(args.screenshot):
            print(f"could not write {args.screenshot}", file=sys.stderr)
            code["rc"] = 1
        else:
            print(args.screenshot)
        win.close()
        app.quit()

    def ended(how):
        if how != "finished":
            print(f"generation {how}: {win.banner.text or win.progress_label.text()}", file=sys.stderr)
            code["rc"] = 1
            QTimer.singleShot(0, save)

    def give_up():
        print(f"gave up after {args.timeout:g} s", file=sys.stderr)
        code["rc"] = 1
        save()

    win.batch_shown.connect(shoot)
    win.job_ended.connect(ended)
    QTimer.singleShot(int(args.timeout * 1000), give_up)
    win.show()
    if not args.prompt:
        win.form.prompt.setPlainText("a lighthouse on a cliff at dusk")

    def go():
        if not win.generate():
            print(f"could not start: {win.banner.text}", file=sys.stderr)
            code["rc"] = 1
            save()
    QTimer.singleShot(100, go)


if __name__ == "__main__":
    sys.exit(main())
