"""The main window: the generation form on the left, the current batch (or the history) in the
middle, refine actions in the toolbar, progress and cancel at the bottom.

Keyboard: Ctrl+Enter generates, Esc cancels; in a grid, arrows move, S or Space stars, Enter opens
the full view; C pins an image for comparison (press again on another to compare); Ctrl+1 / Ctrl+2
vary subtly / strongly, Ctrl+E explores new directions, Ctrl+B blends, Ctrl+U upscales.
"""

import html
import re
import sys
from typing import Optional

from PySide6.QtCore import QByteArray, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QColor, QGuiApplication, QImage, QKeySequence, QPalette, QShortcut
from PySide6.QtWidgets import (QFrame, QHBoxLayout, QLabel, QMainWindow, QMessageBox, QProgressBar,
                               QPushButton, QSplitter, QTabWidget, QToolBar, QVBoxLayout, QWidget)

from mlx_crepulse import RecipeError, metadata

from . import estimate, models, refine, worker
from .blend import BlendDialog
from .controls import Form
from .grid import Grid
from .history import History
from .history_view import HistoryView, plural
from .login import LoginDialog
from .settings import SettingsDialog, previews_on
from .viewer import KINDS, Compare, Viewer, summary
from .worker import Job

STYLE = """
QLabel#section { font-weight: 600; }
QLabel#hint { color: palette(mid); font-size: 11px; }
QLabel#modelNote { color: palette(mid); }
QLabel#modelNote[warn="true"] { color: #e0a030; }
QFrame#banner { border-radius: 6px; padding: 2px; }
QFrame#banner[level="error"] { background: #5c2626; }
QFrame#banner[level="warn"] { background: #5a4a1c; }
QFrame#banner[level="info"] { background: #24405e; }
QFrame#banner QLabel { color: #f2f2f2; }
QPushButton#primary { font-weight: 600; }
QLabel#batchTitle { font-size: 15px; font-weight: 600; }
QLabel#batchInfo { color: palette(mid); }
"""


def apply_theme(app, platform: str = sys.platform):
    """On macOS the native style, light or dark as the system is set (what a Mac user expects of an app);
    elsewhere a dark Fusion theme: images are judged best on a dark, neutral background."""
    if platform == "darwin":
        return
    app.setStyle("Fusion")
    p = QPalette()
    colors = {QPalette.ColorRole.Window: "#2b2d31", QPalette.ColorRole.WindowText: "#e6e6e6",
              QPalette.ColorRole.Base: "#1f2023", QPalette.ColorRole.AlternateBase: "#2b2d31",
              QPalette.ColorRole.ToolTipBase: "#1f2023", QPalette.ColorRole.ToolTipText: "#e6e6e6",
              QPalette.ColorRole.Text: "#e6e6e6", QPalette.ColorRole.Button: "#383a40",
              QPalette.ColorRole.ButtonText: "#e6e6e6", QPalette.ColorRole.Highlight: "#3d8bfd",
              QPalette.ColorRole.HighlightedText: "#ffffff", QPalette.ColorRole.Mid: "#9a9ca3",
              QPalette.ColorRole.PlaceholderText: "#8a8c93", QPalette.ColorRole.Link: "#6aa5ff"}
    for role, c in colors.items():
        p.setColor(role, QColor(c))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText, QPalette.ColorRole.WindowText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor("#6d6f75"))
    app.setPalette(p)


def native(keys: str) -> str:
    """A shortcut as this platform writes it (Ctrl+Return on Linux, \u2318\u21a9 on macOS)."""
    return QKeySequence(keys).toString(QKeySequence.SequenceFormat.NativeText)


URL = re.compile(r"https?://[^\s<>()]*[^\s<>().,;:]")  # a trailing full stop ends the sentence, not the URL


def linked(text: str) -> str:
    """Plain text as a label's rich text, with its URLs as links a click opens."""
    parts, pos = [], 0
    for m in URL.finditer(text):
        url = html.escape(m.group())
        parts += [html.escape(text[pos:m.start()]), f'<a href="{url}">{url}</a>']
        pos = m.end()
    return "".join(parts + [html.escape(text[pos:])]).replace("\n", "<br>")


class Banner(QFrame):
    """A message above the images: errors (a model missing, too little memory), warnings, notes; with a
    button for the action that solves it, where there is one (log in, for a gated model)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("banner")
        self.label = QLabel()
        self.label.setWordWrap(True)
        self.label.setTextFormat(Qt.TextFormat.RichText)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextBrowserInteraction)
        self.label.setOpenExternalLinks(True)  # a gated model's page, where its licence is accepted
        self.plain = ""
        close = QPushButton("\u2715")
        close.setFlat(True)
        close.setFixedWidth(28)
        close.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        close.clicked.connect(self.hide)
        self.action = None
        self.action_btn = QPushButton()
        self.action_btn.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.action_btn.clicked.connect(lambda: self.action is not None and self.action.trigger())
        lay = QHBoxLayout(self)
        lay.setContentsMargins(10, 6, 6, 6)
        lay.addWidget(self.label, 1)
        lay.addWidget(self.action_btn)
        lay.addWidget(close)
        self.hide()

    def show_message(self, text: str, level: str = "error", action: Optional[QAction] = None):
        self.plain = text
        self.label.setText(linked(text))
        self.action = action
        self.action_btn.setText(action.text() if action is not None else "")
        self.action_btn.setVisible(action is not None)
        self.setProperty("level", level)
        self.style().unpolish(self)
        self.style().polish(self)
        self.show()

    @property
    def text(self) -> str:
        return self.plain if self.isVisible() else ""


class MainWindow(QMainWindow):
    batch_shown = Signal(int)  # a batch made in this window is in the history and on screen
    job_ended = Signal(str)  # "finished", "cancelled" or "failed"

    def __init__(self, data_dir=None, settings: Optional[QSettings] = None, engine=None):
        super().__init__()
        self.setWindowTitle("mlx-crepulse")
        self.history = History(data_dir)
        self.settings = settings if settings is not None else QSettings()
        self.engine = engine if engine is not None else worker.engine()
        self.engine.previews = previews_on(self.settings)
        self.job: Optional[Job] = None
        self.queue: list = []  # jobs waiting for the running one, oldest first
        self.batch = None  # the batch on the Batch tab (a history.Batch)
        self.pinned = None  # an image pinned for comparison
        self.dialogs = []  # open viewers and comparisons
        self.defaults = {}  # source -> the model's defaults, once loaded
        no, yes = QMessageBox.StandardButton.No, QMessageBox.StandardButton.Yes
        # the safe answer is the default: a download of many gigabytes, a model that may not fit
        self.ask = lambda title, text: QMessageBox.question(self, title, text, yes | no, no) == yes

        self._lay_out()
        self._wire()
        self._restore()

    def _lay_out(self):
        """The form at the left; the Batch and History tabs, the banner and the progress row at the right."""
        self.form = Form(self.settings)
        self.form.recent_prompts = lambda: self.history.recent_prompts(15)
        self.form.setMinimumWidth(300)
        self.form.setMaximumWidth(380)
        self.grid = Grid()
        self.banner = Banner()
        self.title = QLabel()
        self.title.setObjectName("batchTitle")
        self.title.setWordWrap(True)
        self.info = QLabel()
        self.info.setObjectName("batchInfo")
        self.info.setWordWrap(True)
        self.info.setTextFormat(Qt.TextFormat.RichText)
        self.info.linkActivated.connect(self._follow)  # the lineage: a batch's parent and children
        batch_page = QWidget()
        bl = QVBoxLayout(batch_page)
        bl.setContentsMargins(12, 10, 12, 0)
        bl.addWidget(self.title)
        bl.addWidget(self.info)
        bl.addWidget(self.grid, 1)
        self.history_view = HistoryView(self.history)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(True)
        self.favourites = Grid(tile=160, max_tile=320)  # every starred image, newest batch first
        self.tabs.addTab(batch_page, "Batch")
        self.tabs.addTab(self.history_view, "History")
        self.tabs.addTab(self.favourites, "Favourites")

        prow = self._progress_row()

        centre = QWidget()
        cl = QVBoxLayout(centre)
        cl.setContentsMargins(0, 6, 0, 0)
        cl.setSpacing(4)
        bw = QWidget()
        bwl = QHBoxLayout(bw)
        bwl.setContentsMargins(12, 0, 12, 0)
        bwl.addWidget(self.banner)
        cl.addWidget(bw)
        cl.addWidget(self.tabs, 1)
        cl.addLayout(prow)
        split = QSplitter()
        split.addWidget(self.form)
        split.addWidget(centre)
        split.setStretchFactor(1, 1)
        split.setCollapsible(0, False)
        self.setCentralWidget(split)
        self._make_actions()

    def _progress_row(self) -> QHBoxLayout:
        """The label, the bar and Cancel under the images."""
        self.progress = QProgressBar()
        self.progress.setTextVisible(False)
        self.progress.setFixedHeight(10)
        self.progress_label = QLabel("Ready")
        self.progress_label.setMinimumWidth(260)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setToolTip("Stop after the current step (Esc)")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        self.queue_label = QLabel()
        self.queue_label.setObjectName("hint")
        self.clear_queue_btn = QPushButton("Clear queue")
        self.clear_queue_btn.setToolTip("Drop the batches waiting their turn; the one running goes on")
        self.clear_queue_btn.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.clear_queue_btn.clicked.connect(self.clear_queue)
        prow = QHBoxLayout()
        prow.setContentsMargins(12, 6, 12, 8)
        prow.addWidget(self.progress_label)
        prow.addWidget(self.progress, 1)
        prow.addWidget(self.queue_label)
        prow.addWidget(self.clear_queue_btn)
        prow.addWidget(self.cancel_btn)

        return prow

    def _wire(self):
        self.form.generate_requested.connect(self.generate)
        self.form.model_changed.connect(self.update_model_state)
        self.form.changed.connect(self.update_estimate)
        self.form.download_requested.connect(self.download)
        self.grid.selection_changed.connect(lambda _: self._update_actions())
        self.grid.star_toggled.connect(self._star_from_grid)
        self.grid.opened.connect(lambda i: self.open_viewer(self.grid.items(), i))
        self.favourites.selection_changed.connect(lambda _: self._update_actions())
        self.favourites.star_toggled.connect(self._star_from_grid)
        self.favourites.opened.connect(lambda i: self.open_viewer(self.favourites.items(), i))
        self.history_view.selection_changed.connect(lambda _: self._update_actions())
        self.history_view.star_toggled.connect(lambda i, s: self.grid.set_starred(i, s))
        self.history_view.opened.connect(self.open_viewer)
        self.history_view.use_settings.connect(self.use_settings)
        self.history_view.run_again.connect(self.run_again)
        self.history_view.message.connect(self.statusBar().showMessage)
        self.history_view.deleted.connect(self._deleted)
        self.tabs.currentChanged.connect(self._tab_changed)
        self.downloader = models.Downloader(self)
        self.downloader.progress.connect(self._download_progress)
        self.downloader.finished.connect(self._download_finished)
        self.downloader.failed.connect(self._download_failed)
        self._connections = [(self.engine.status, self._engine_status), (self.engine.loaded, self._loaded),
                             (self.engine.warning, self._warning),
                             (self.engine.progress, self._progress), (self.engine.preview, self._preview),
                             (self.engine.finished, self._finished), (self.engine.cancelled, self._cancelled),
                             (self.engine.failed, self._failed)]
        for signal, slot in self._connections:
            signal.connect(slot)

    def _restore(self):
        """Preferences, geometry, and the latest batch of the history on screen."""
        self.form.restore()
        geometry = self.settings.value("window/geometry")
        if isinstance(geometry, QByteArray) and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        else:
            self.resize(1240, 820)
        latest = self.history.batches(limit=1)
        if latest:
            self.show_batch(latest[0].id)
        else:
            self._show_empty()
        self.update_model_state()
        self._show_queue()
        self.update_estimate()
        self.form.prompt.setFocus()
        self.statusBar().showMessage(f"history: {self.history.folder}", 8000)

    # --- actions and shortcuts ---------------------------------------------------------------------

    def _make_actions(self):
        """Every action once: in the menu bar (with its shortcut) and, for the selected image, in a toolbar
        above the tabs (in the tab bar's corner it squeezed the tabs away at narrow widths)."""
        tb = QToolBar("Selected image")
        tb.setObjectName("imageActions")
        tb.setMovable(False)
        tb.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        tb.setStyleSheet("QToolBar { border: none; spacing: 2px; } QToolButton { padding: 3px 7px; }")
        self.addToolBar(Qt.ToolBarArea.TopToolBarArea, tb)
        self.toolbar = tb
        self.actions_ = {}
        menus = {name: self.menuBar().addMenu(name) for name in ("&File", "&Edit", "&Image", "&View", "&Help")}

        def act(name, text, tip, shortcut, fn, menu="&Image", toolbar=True):
            a = QAction(text, self)
            a.setToolTip(f"{tip} ({QKeySequence(shortcut).toString(QKeySequence.SequenceFormat.NativeText)})"
                         if shortcut else tip)
            a.setStatusTip(tip)
            if shortcut:
                a.setShortcut(QKeySequence(shortcut))
            a.triggered.connect(fn)
            menus[menu].addAction(a)
            if toolbar:
                tb.addAction(a)
                tb.widgetForAction(a).setFocusPolicy(Qt.FocusPolicy.NoFocus)
            self.actions_[name] = a
            return a

        act("generate", "Generate", "Make a batch from the form", "Ctrl+Return", self.generate, "&File", False)
        act("cancel", "Cancel", "Stop after the current step (the queue goes on)", "Escape", self.cancel, "&File", False)
        act("clear_queue", "Clear queue", "Drop the batches waiting their turn", "Shift+Escape", self.clear_queue,
            "&File", False)
        menus["&File"].addSeparator()
        act("login", "Log in to Hugging Face\u2026", "Save an access token, for the gated models (FLUX.1-dev, "
            "FLUX.2 [klein] 9B)", None, lambda: self.login(), "&File", False)
        menus["&File"].addSeparator()
        quit_ = act("quit", "Quit", "Close the window", QKeySequence.StandardKey.Quit, self.close, "&File", False)
        quit_.setMenuRole(QAction.MenuRole.QuitRole)
        self._edit_actions(act, menus["&Edit"])
        self._image_actions(act)
        tb.addSeparator()
        act("view", "View", "Show the selected image full size", "Return", self.view_selected, "&View")
        act("star", "Star", "Star or un-star the selected image; Space does it too", "S", self.toggle_star, "&View")
        act("compare", "Compare", "Pin the selected image, then compare it with another", "C", self.compare_step,
            "&View")
        image_actions = [self.actions_[k] for k in ("view", "star", "compare", "subtle", "strong", "explore", "blend",
                                                     "upscale", "twin")]
        for grid in (self.grid, self.history_view.grid, self.favourites):  # right-click and hover: the same actions
            grid.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
            grid.addActions(image_actions + [self.actions_["copy_image"], self.actions_["copy_parameters"]])
            grid.action.connect(self._bar_action)
        for name in ("view", "star", "compare", "copy_image"):  # keys of the grid: typed in a text field they are text
            self.actions_[name].setShortcutContext(Qt.ShortcutContext.WidgetWithChildrenShortcut)
        menus["&View"].addSeparator()
        act("next_tab", "Next Tab", "Batch, History, Favourites in turn", "Ctrl+Tab",
            lambda: self.tabs.setCurrentIndex((self.tabs.currentIndex() + 1) % self.tabs.count()), "&View", False)
        act("previous_tab", "Previous Tab", "Back through the tabs", "Ctrl+Shift+Tab",
            lambda: self.tabs.setCurrentIndex((self.tabs.currentIndex() - 1) % self.tabs.count()), "&View", False)
        act("shortcuts", "Keyboard Shortcuts", "Every key the app answers to", "F1", self.show_shortcuts, "&Help", False)
        about = act("about", "About mlx-crepulse", "What this is", None, self._about, "&Help", False)
        about.setMenuRole(QAction.MenuRole.AboutRole)
        QShortcut(QKeySequence("Ctrl+Enter"), self, self.generate, context=Qt.ShortcutContext.WindowShortcut)

    def _edit_actions(self, act, menu):
        act("copy_image", "Copy Image", "Copy the selected image, to paste it into another app",
            QKeySequence.StandardKey.Copy, self.copy_image, "&Edit", False)
        act("copy_parameters", "Copy Prompt and Settings", "Copy the selected image's prompt, seed and settings "
            "as text (AUTOMATIC1111's format)", "Ctrl+Shift+C", self.copy_parameters, "&Edit", False)
        menu.addSeparator()
        settings = act("settings", "Settings\u2026", "Previews, and where the app keeps things",
                       "Ctrl+,", self.open_settings, "&Edit", False)  # \u2318, on macOS
        settings.setMenuRole(QAction.MenuRole.PreferencesRole)  # macOS: in the application menu

    def _image_actions(self, act):
        act("subtle", "Vary subtly", "New images close to the selected one", "Ctrl+1", lambda: self.vary(refine.SUBTLE))
        act("strong", "Vary strongly", "New images loosely based on the selected one", "Ctrl+2",
            lambda: self.vary(refine.STRONG))
        act("explore", "Explore new directions", "A new batch pushed away from every image already seen for "
            "this prompt", "Ctrl+E", lambda: self.explore())
        act("blend", "Blend\u2026", "Blend the selected favourite with another in the contextual space", "Ctrl+B",
            lambda: self.blend_dialog())
        act("upscale", "Upscale \u00d72", "Regenerate the selected image at twice the size from itself", "Ctrl+U",
            lambda: self.upscale())
        act("twin", "Diversity off", "The batch again with the same seeds and no diversity: what it did",
            "Ctrl+0", lambda: self.twin())

    def _bar_action(self, index, name):
        """A tile's hover bar: the tile is selected already; run the menu's action on it."""
        action = self.actions_[name]
        if action.isEnabled():
            action.trigger()

    GRID_KEYS = [("Arrows, Home, End", "move through the images"), ("Space", "star or un-star, as S does"),
                 ("Ctrl+Enter", "generate, as Ctrl+Return does")]

    def shortcuts_text(self) -> str:
        """Every action with a shortcut, read from the actions themselves, and the grid's own keys."""
        rows = [(a.shortcut().toString(QKeySequence.SequenceFormat.NativeText), a.text().replace("&", ""))
                for a in self.actions_.values() if not a.shortcut().isEmpty()]
        rows += self.GRID_KEYS
        cells = "".join(f"<tr><td><b>{html.escape(k)}</b>&nbsp;&nbsp;</td><td>{html.escape(t)}</td></tr>"
                        for k, t in rows)
        return f"<table>{cells}</table>"

    def show_shortcuts(self):
        box = QMessageBox(QMessageBox.Icon.NoIcon, "Keyboard shortcuts", self.shortcuts_text(),
                          QMessageBox.StandardButton.Close, self)
        box.setTextFormat(Qt.TextFormat.RichText)
        box.exec()

    def _about(self):
        QMessageBox.about(self, "mlx-crepulse", "Varied images from FLUX with contextual repulsion "
                          f"(Dahary et al. 2026), offline. History: {self.history.folder}")

    def _tab_changed(self, index):
        if index == 1:
            self.history_view.refresh()  # star counts and new batches
        elif index == 2:
            self.favourites.set_images(self.history.starred())
        self._update_actions()

    def _grid(self):
        """The grid of the tab on screen: the batch, the history's batch, or the favourites."""
        return (self.grid, self.history_view.grid, self.favourites)[self.tabs.currentIndex()]

    def selected_image(self):
        return self._grid().current_item()

    def _update_actions(self):
        im = self.selected_image()  # while a batch runs, refinements join the queue
        for name in ("subtle", "strong", "blend", "upscale", "view", "star", "compare", "copy_image",
                     "copy_parameters"):
            self.actions_[name].setEnabled(im is not None)
        self.actions_["explore"].setEnabled(self._context_batch() is not None)
        self.actions_["twin"].setEnabled(self._context_batch() is not None)
        self.actions_["clear_queue"].setEnabled(bool(self.queue))
        self.actions_["star"].setText("Unstar" if im is not None and im.starred else "Star")
        pinned = self.pinned is not None
        self.actions_["compare"].setText("Compare with pinned" if pinned else "Compare")

    def _context_batch(self):
        im = self.selected_image()
        if im is not None:
            return self.history.batch(im.batch_id)
        if self.tabs.currentIndex() == 0:  # while a batch runs, its previews fill the Batch tab
            return self.batch if self.job is None else None
        return self.history_view.current_batch()

    # --- generating --------------------------------------------------------------------------------

    def generate(self):
        if not self.form.prompt_text():
            self.banner.show_message("Write a prompt first: describe the image you want.", "warn")
            self.form.prompt.setFocus()
            return False
        try:
            recipe = self.form.recipe()
        except RecipeError as e:
            self.banner.show_message(str(e), "warn")
            return False
        self.form.save()
        return self.start(Job(recipe, low_memory=self.form.low_memory.isChecked(), loras=self.form.loras()))

    def start(self, job: Job) -> bool:
        """Check the model (on disk? enough memory?) and hand the job to the engine thread, or queue it
        while another batch runs."""
        problem = models.availability(job.source)
        if problem:
            repo = models.repo_of(job.source)
            blocked = repo and self._download_blocked(job.source)
            if blocked:  # no download offered that could not be stored or would not run here
                self.banner.show_message(blocked)
                return False
            gb = models.download_gb(job.source)
            size = f"about {gb:.0f} GB" if gb else "its size shows once it starts"
            if repo and self.ask("Download the model?", f"{problem}. Download it now from the Hugging Face Hub? "
                                 f"({size}; it resumes if stopped)"):
                self.download(job.source)
            else:
                self.banner.show_message(problem + (" \u2014 use Download beside the model." if repo else ""))
            return False
        mem = models.memory_problem(job.source, job.quantize)
        if mem and not self.ask("Not enough memory", mem + "\n\nTry anyway?"):
            self.banner.show_message(mem, "warn")
            return False
        if self.engine.busy or self.queue:
            self.queue.append(job)
            self._show_queue()
            self.statusBar().showMessage(f"queued: {KINDS.get(job.kind, job.kind).lower()} of \u201c{job.prompt}\u201d "
                                         "starts when the batch before it is done", 5000)
            return True
        return self._launch(job)

    def _launch(self, job: Job) -> bool:
        if not self.engine.submit(job, self.history):
            return False
        self.job = job
        self.banner.hide()
        self.form.set_busy(True)
        self.cancel_btn.setEnabled(True)
        self.progress.setRange(0, 0)
        self.progress_label.setText("Starting\u2026")
        self.tabs.setCurrentIndex(0)
        self.title.setText(job.prompt)
        self.info.setText(f"{KINDS.get(job.kind, job.kind)} \u00b7 {plural(job.n, 'image')} \u00b7 {models.label(job.source)}"
                          " \u00b7 working\u2026")
        self.grid.set_placeholders(job.n, job.labels)
        self._show_queue()
        self._update_actions()
        return True

    def _next(self):
        """Start the oldest queued job, once the engine is free."""
        if self.queue and not self.engine.busy and self.job is None:
            self._launch(self.queue.pop(0))

    def _show_queue(self):
        n = len(self.queue)
        self.queue_label.setText(f"{n} waiting" if n else "")
        self.queue_label.setVisible(bool(n))
        self.clear_queue_btn.setVisible(bool(n))
        self.form.set_busy(self.job is not None)
        self._update_actions()

    def clear_queue(self):
        self.queue.clear()
        self._show_queue()

    def cancel(self):
        """Stop the download, or the running batch after its current step; queued batches go on."""
        if self.downloader.running:
            self.downloader.stop()
            return
        if self.job is not None and self.engine.busy:
            self.engine.cancel()
            self.progress_label.setText("Cancelling after this step\u2026")
            self.cancel_btn.setEnabled(False)

    def vary(self, variation) -> bool:
        im = self.selected_image()
        if im is None:
            return False
        return self.start(refine.vary(self.history, im, variation, self.form.n.value(),
                                      low_memory=self.form.low_memory.isChecked()))

    def explore(self) -> bool:
        b = self._context_batch()
        if b is None:
            return False
        return self.start(refine.explore(self.history, b, self.form.n.value(), self.form.diversity_value(),
                                         low_memory=self.form.low_memory.isChecked()))

    def blend(self, a, b, alphas) -> bool:
        return self._start_made(lambda: refine.blend(self.history, a, b, alphas,
                                                     low_memory=self.form.low_memory.isChecked()))

    def blend_dialog(self):
        a = self.selected_image()
        if a is None:
            return
        candidates = refine.blend_candidates(self.history, a)
        if not candidates:
            self.banner.show_message("Star another image of the same prompt and settings (size, steps, guidance) "
                                     "to blend with this one; upscaled images cannot be blended.", "info")
            return
        dlg = BlendDialog(a, candidates, self)
        if dlg.exec() and dlg.b is not None:
            self.blend(a, dlg.b, dlg.alphas)

    def upscale(self) -> bool:
        im = self.selected_image()
        return im is not None and self._start_made(
            lambda: refine.upscale(self.history, im, low_memory=self.form.low_memory.isChecked()), "info")

    def twin(self) -> bool:
        b = self._context_batch()
        return b is not None and self._start_made(
            lambda: refine.twin(self.history, b, low_memory=self.form.low_memory.isChecked()), "info")

    def _start_made(self, make, level: str = "error") -> bool:
        """Start the job `make()` builds; a refinement that cannot be made says why in the banner."""
        try:
            job = make()
        except ValueError as e:
            self.banner.show_message(str(e), level)
            return False
        return self.start(job)

    def run_again(self, batch) -> bool:
        return self.start(refine.rerun(self.history, batch, low_memory=self.form.low_memory.isChecked()))

    def use_settings(self, batch):
        self.form.load_recipe(batch.recipe, self.defaults.get(batch.recipe.get("model")))
        self.statusBar().showMessage("settings loaded into the form, with a new seed (Run again makes that very "
                                     "batch)", 6000)
        self.form.prompt.setFocus()

    # --- engine signals ----------------------------------------------------------------------------

    def update_estimate(self):
        """The form's time estimate, from this model's speed on the batches in the history."""
        try:
            wanted = self.form.recipe(prompt="estimate").to_dict()
        except RecipeError:
            self.form.estimate.setText("")
            return
        for key, value in self.defaults.get(wanted["model"], {}).items():
            if key in wanted and wanted[key] is None:
                wanted[key] = value
        seconds = estimate.seconds(wanted, self.history.batches(limit=200))
        self.form.estimate.setText(estimate.describe(seconds, self.engine.loaded_source != wanted["model"]))

    def _mine(self) -> bool:
        return self.job is not None

    def _engine_status(self, text):
        if self._mine():
            self.progress_label.setText(text[:1].upper() + text[1:])

    def _warning(self, text):
        if self._mine():
            self.banner.show_message(text, "info")

    def _loaded(self, source, defaults):
        self.defaults[source] = defaults
        if source == self.form.source():
            self.form.steps.setSpecialValueText(f"default ({defaults['steps']})")
            for s, key in ((self.form.width_, "width"), (self.form.height_, "height")):
                s.setSpecialValueText(f"default ({defaults[key]})")
            self.form.set_model_size(defaults["width"], defaults["height"])
        self.update_estimate()

    def _progress(self, step, steps, elapsed, eta):
        if not self._mine():
            return
        self.progress.setRange(0, steps)
        self.progress.setValue(step)
        left = f"about {eta:.0f} s left" if eta >= 1 else ("finishing" if step == steps else "under a second left")
        self.progress_label.setText(f"Step {step} of {steps} \u00b7 {left}")

    def _preview(self, images, step, steps):
        if self._mine():
            self.grid.set_previews(images, step, steps)

    def _end(self, how: str):
        self.job = None
        self.form.set_busy(False)
        self.cancel_btn.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self._show_queue()
        self.job_ended.emit(how)
        if self.queue:  # after this signal's other slots: the engine is free by then
            QTimer.singleShot(0, self._next)

    def _finished(self, batch_id):
        if not self._mine():
            return
        job = self.job
        self._end("finished")
        self.progress.setValue(1)
        self.show_batch(batch_id)
        b = self.batch
        self.progress_label.setText(f"{plural(len(b.images), 'image')} in {b.seconds:.1f} s")
        self.history_view.refresh(select_batch=batch_id)  # History follows: Run again and Export act on it
        self.grid.setFocus()  # keys now move, star and open; typed into the prompt they changed it
        self.update_estimate()
        if job.kind != "generate":
            self.statusBar().showMessage(f"{KINDS.get(job.kind, job.kind)}: batch {batch_id}", 6000)
        self.batch_shown.emit(batch_id)

    def _cancelled(self):
        if not self._mine():
            return
        self._end("cancelled")
        self.progress_label.setText("Cancelled")
        self._restore_batch()

    def _failed(self, message, kind):
        if not self._mine():
            return
        self._end("failed")
        self.progress_label.setText("Failed")
        if kind == "weights":
            self.update_model_state()  # a model gone from the cache: the form offers its download again
        self.banner.show_message(message, "warn" if kind == "value" else "error")
        self._restore_batch()

    def _restore_batch(self):
        if self.batch is not None:
            self.show_batch(self.batch.id)
        else:
            self._show_empty()

    # --- showing batches ---------------------------------------------------------------------------

    def show_batch(self, batch_id: int):
        b = self.history.batch(batch_id)
        if b is None:
            return
        self.batch = b
        self.title.setText(b.prompt)
        origin = ""
        parent = self.history.image(b.parent_image) if b.parent_image else None
        if parent is not None:
            origin = f' from <a href="image:{parent.id}">image {parent.index + 1} of batch {parent.batch_id}</a>'
            if b.kind == "blend" and b.note.get("b"):
                other = self.history.image(b.note["b"])
                if other is not None:
                    origin += f' and <a href="image:{other.id}">image {other.index + 1} of batch {other.batch_id}</a>'
        text = html.escape(summary(b.recipe))
        kind_text = text.split(" \u00b7 ")[0]
        children = [c for c in self.history.batches(b.prompt) if c.parent_image in {im.id for im in b.images}]
        made = (" \u00b7 made from it: " + ", ".join(f'<a href="batch:{c.id}">batch {c.id}</a>' for c in children)
                if children else "")
        self.info.setText(f"batch {b.id}: {kind_text}{origin}{text[len(kind_text):]}{made}")
        self.grid.set_images(b.images)
        self._update_actions()

    def _follow(self, link: str):
        """A lineage link: "image:ID" shows that image's batch with it selected, "batch:ID" that batch."""
        kind, _, ident = link.partition(":")
        image = self.history.image(int(ident)) if kind == "image" else None
        batch_id = image.batch_id if image is not None else int(ident)
        self.tabs.setCurrentIndex(0)
        self.show_batch(batch_id)
        if image is not None:
            self.grid.select(image.index)

    def _deleted(self, batch_id):
        if self.batch is not None and self.batch.id == batch_id:
            latest = self.history.batches(limit=1)
            if latest:
                self.show_batch(latest[0].id)
            else:
                self._show_empty()

    def _show_empty(self):
        self.batch = None
        self.title.setText("Nothing yet")
        hints = [("Ctrl+Return", "generate"), ("Esc", "cancel"), (None, "arrows move"), ("S", "star"),
                 ("Return", "full view"), ("C", "compare"), ("Ctrl+1", "vary subtly"), ("Ctrl+2", "vary strongly"),
                 ("Ctrl+E", "explore"), ("Ctrl+B", "blend"), ("Ctrl+U", "upscale")]
        keys = " \u00b7 ".join(f"<b>{native(k)}</b> {what}" if k else what for k, what in hints)
        self.info.setText(f"Write a prompt on the left and press Generate ({native('Ctrl+Return')}). Every batch "
                          f"is kept in History.<br><br>{keys}")
        self.grid.clear()

    def toggle_star(self):
        self._grid().toggle_star()

    def _star_from_grid(self, image_id, starred):
        self.history.set_starred(image_id, starred)
        self.history_view.set_starred(image_id, starred)
        self.grid.set_starred(image_id, starred)
        self._update_actions()

    def _star_from_viewer(self, image_id, starred):
        self.grid.set_starred(image_id, starred)
        self.history_view.set_starred(image_id, starred)
        self._update_actions()

    def copy_image(self) -> bool:
        im = self.selected_image()
        if im is None:
            return False
        QGuiApplication.clipboard().setImage(QImage(str(im.path)))
        self.statusBar().showMessage("image copied", 3000)
        return True

    def copy_parameters(self) -> bool:
        """The text the image's PNG carries for other tools (prompt, seed, steps, ...), as written."""
        im = self.selected_image()
        if im is None:
            return False
        text = metadata.read_text_chunks(im.path).get("parameters")
        if text is None:
            self.banner.show_message(f"{im.path.name} carries no settings: was it changed by another program?", "warn")
            return False
        QGuiApplication.clipboard().setText(text)
        self.statusBar().showMessage("prompt and settings copied", 3000)
        return True

    def open_settings(self):
        dlg = SettingsDialog(self.settings, self.engine, self.history.folder, lambda: self.login(), self)
        dlg.exec()
        return dlg

    def view_selected(self):
        grid = self._grid()
        if grid.current_item() is not None:
            self.open_viewer(grid.items(), grid.current)

    def open_viewer(self, items, index) -> Viewer:
        v = Viewer(self.history, items, index, self)
        v.star_toggled.connect(self._star_from_viewer)
        self._keep(v)
        return v

    def compare(self, a, b) -> Compare:
        c = Compare(self.history, a, b, self)
        self._keep(c)
        return c

    def compare_step(self):
        im = self.selected_image()
        if im is None:
            return
        if self.pinned is None or self.pinned.id == im.id:
            self.pinned = im
            self.statusBar().showMessage("pinned for comparison: select another image and press C", 6000)
        else:
            self.compare(self.pinned, im)
            self.pinned = None
            self.statusBar().clearMessage()
        self._update_actions()

    def _keep(self, dialog):
        """Show a viewer or comparison; it deletes itself on close, and leaves the list as it goes (a dead
        wrapper left in the list broke the next open and the window's own closing)."""
        self.dialogs.append(dialog)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.destroyed.connect(lambda *_: self._forget(dialog))
        dialog.show()

    def _forget(self, dialog):
        self.dialogs = [d for d in self.dialogs if d is not dialog]

    # --- models ------------------------------------------------------------------------------------

    def update_model_state(self):
        self.banner.hide()  # what it said was about the model chosen before
        if self.job is None and self.progress_label.text() in ("Failed", "Cancelled"):
            self.progress_label.setText("Ready")
        source, bits = self.form.source(), self.form.quantize()
        problem = models.availability(source)
        mem = models.memory_problem(source, bits)
        if self.downloader.running and models.repo_of(source) == self.downloader.repo:
            return
        too_big = problem and models.repo_of(source) and self._too_big(source)
        if too_big:  # "not downloaded" alone would hide that downloading cannot help
            self.form.show_model_state(too_big, True, False)
        elif problem:
            self.form.show_model_state(problem, True, models.repo_of(source) is not None)
        elif mem:
            self.form.show_model_state(mem, True, False)
        else:
            need = models.needs_gb(source, bits)
            self.form.show_model_state(f"needs about {need:.0f} GB of memory" if need >= 1 else "tiny: runs anywhere",
                                       False, False)

    def _too_big(self, source: str) -> Optional[str]:
        """Why downloading `source` would not help: even at 4-bit it does not fit this machine's memory."""
        mem = models.memory_problem(source, 4)
        return f"Not downloaded, and too big for this machine: {mem}" if mem else None

    def _download_blocked(self, source: str) -> Optional[str]:
        """Why a download of `source` is not offered (too big to run here, or for the disk), else None."""
        disk = models.disk_problem(source)
        return self._too_big(source) or (
            f"{models.label(source)} cannot be downloaded. {disk}. Free some space, then try again." if disk else None)

    def download(self, source: str):
        repo = models.repo_of(source)
        if repo is None or self.downloader.running:
            return
        blocked = self._download_blocked(source)
        if blocked:
            self.banner.show_message(blocked)
            return
        self.downloader.start(repo)
        self.form.download.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setRange(0, 0)
        self.progress_label.setText(f"Downloading {models.label(source)}\u2026")

    def _download_progress(self, done, total):
        gb = 1e9
        if total:
            self.progress.setRange(0, 1000)
            self.progress.setValue(int(1000 * done / total))
            self.progress_label.setText(f"Downloading: {done / gb:.1f} of {total / gb:.1f} GB")
        else:
            self.progress_label.setText(f"Downloading: {done / gb:.1f} GB")

    def _download_finished(self, folder):
        self._download_end()
        self.progress_label.setText("Download complete")
        self.banner.show_message(f"{models.label(self.form.source())} is ready: press Generate.", "info")

    def _download_failed(self, message, kind):
        self._download_end()
        self.progress_label.setText("Download stopped")
        self.banner.show_message(message, action=self.actions_["login"] if kind == "gated" else None)

    def login(self) -> bool:
        """Log in to Hugging Face (File menu, or the banner of a gated download): True once a token is saved."""
        dlg = LoginDialog(self)
        if not dlg.exec():
            return False
        self.banner.hide()  # what it said (a gated model, say) is answered
        self.statusBar().showMessage(f"Logged in to Hugging Face as {dlg.user or 'you'}: download again", 8000)
        return True

    def _download_end(self):
        self.form.download.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.update_model_state()

    # --- closing -----------------------------------------------------------------------------------

    def closeEvent(self, event):
        self.form.save()
        self.settings.setValue("window/geometry", self.saveGeometry())
        self.settings.sync()
        self.queue.clear()
        if self.job is not None:
            self.engine.cancel()
        self.downloader.stop()
        for signal, slot in self._connections:
            try:
                signal.disconnect(slot)
            except (RuntimeError, TypeError):
                pass
        self._connections = []
        for d in list(self.dialogs):
            d.close()
        self.history.close()
        super().closeEvent(event)
