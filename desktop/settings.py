"""Settings… (Preferences on macOS, in the application menu): what the app does while a batch runs,
and where it keeps things: the history and images, and the models downloaded from the Hub."""

from pathlib import Path

from PySide6.QtCore import QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (QCheckBox, QDialog, QDialogButtonBox, QGridLayout, QLabel, QPushButton,
                               QVBoxLayout)

from mlx_crepulse import hub

PREVIEWS = "app/previews"  # the QSettings key: show previews while a batch is made


def previews_on(settings) -> bool:
    return settings.value(PREVIEWS, True, type=bool)


class SettingsDialog(QDialog):
    """The app's settings; a change takes effect at once and is kept in `settings`."""

    def __init__(self, settings, engine, history_folder: Path, login, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Settings")
        self.settings, self.engine = settings, engine
        self.previews = QCheckBox("Show previews while a batch is made")
        self.previews.setToolTip("Each step's prediction of the images. Off, a batch finishes a little sooner "
                                 "on large images.")
        self.previews.setChecked(previews_on(settings))
        self.previews.toggled.connect(self._set_previews)
        places = QGridLayout()
        for row, (what, folder) in enumerate((("History and images", Path(history_folder)),
                                              ("Downloaded models", hub.cache_dir()))):
            path = QLabel(str(folder))
            path.setWordWrap(True)
            show = QPushButton("Show")
            show.setToolTip(f"Open {folder} in the file manager")
            show.clicked.connect(lambda _=False, f=folder: self.show_folder(f))
            places.addWidget(QLabel(f"<b>{what}</b>"), row, 0)
            places.addWidget(path, row, 1)
            places.addWidget(show, row, 2)
        places.setColumnStretch(1, 1)
        account = QPushButton("Log in to Hugging Face\u2026")
        account.setToolTip("For the gated models (FLUX.1-dev, FLUX.2 [klein] 9B)")
        account.clicked.connect(login)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(self.previews)
        lay.addSpacing(8)
        lay.addLayout(places)
        lay.addWidget(account)
        lay.addWidget(buttons)
        self.setMinimumWidth(520)

    def _set_previews(self, on: bool):
        self.settings.setValue(PREVIEWS, on)
        self.engine.previews = on

    @staticmethod
    def show_folder(folder: Path):
        folder.mkdir(parents=True, exist_ok=True)  # the Hub's cache appears with the first download
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))
