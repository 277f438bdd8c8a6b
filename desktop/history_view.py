"""Browsing past batches: a list (newest first, filter by prompt text or to starred images), the
chosen batch's images as a grid, and what to do with it: use its settings, run its recipe again,
export its images, delete it."""

import time

from PySide6.QtCore import QRect, QSize, Qt, Signal
from PySide6.QtGui import QColor, QIcon, QImage, QPainter, QPixmap
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QHBoxLayout, QLabel, QLineEdit, QListWidget,
                               QListWidgetItem, QMessageBox, QPushButton, QSplitter, QVBoxLayout, QWidget)

from .grid import Grid, draw_image
from .viewer import KINDS, summary

THUMB = 30  # a batch's icon: its first four images, 2 x 2


def mosaic_icon(images) -> QIcon:
    """The first four images of a batch as a 2 x 2 mosaic, for the batch list."""
    side = 2 * THUMB + 2
    pm = QPixmap(side, side)
    pm.fill(Qt.GlobalColor.transparent)
    p = QPainter(pm)
    for i, im in enumerate(images[:4]):
        r = QRect((i % 2) * (THUMB + 2), (i // 2) * (THUMB + 2), THUMB, THUMB)
        p.fillRect(r, QColor("#1e1f22"))
        draw_image(p, QImage(str(im.path)), r)
    p.end()
    return QIcon(pm)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


class HistoryView(QWidget):
    selection_changed = Signal(object)  # the current history.Image, or None
    opened = Signal(list, int)  # images, index: show full size
    use_settings = Signal(object)  # a history.Batch
    run_again = Signal(object)
    star_toggled = Signal(int, bool)
    message = Signal(str)
    deleted = Signal(int)

    def __init__(self, history, parent=None):
        super().__init__(parent)
        self.history = history
        self.search = QLineEdit()
        self.search.setPlaceholderText("Filter by prompt")
        self.search.setClearButtonEnabled(True)
        self.starred_only = QCheckBox("\u2605 Starred only")
        self.list = QListWidget()
        self.list.setIconSize(QSize(2 * THUMB + 2, 2 * THUMB + 2))
        self.list.setUniformItemSizes(True)
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setWordWrap(False)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self._icons = {}  # batch id -> its mosaic
        self.list.setSpacing(2)
        self.header = QLabel()
        self.header.setWordWrap(True)
        self.header.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.use_btn = QPushButton("Use settings")
        self.use_btn.setToolTip("Put this batch's prompt and settings into the form")
        self.rerun_btn = QPushButton("Run again")
        self.rerun_btn.setToolTip("Run this batch's exact recipe again (same noise, same settings)")
        self.export_btn = QPushButton("Export\u2026")
        self.export_btn.setToolTip("Copy the images shown (PNG files with their recipes) to a folder")
        self.delete_btn = QPushButton("Delete")
        self.grid = Grid(tile=160, max_tile=320)
        self._lay_out()
        self.search.textChanged.connect(lambda _: self.refresh())
        self.starred_only.toggled.connect(lambda _: self.refresh())
        self.list.currentItemChanged.connect(lambda *_: self._show_current())
        self.grid.selection_changed.connect(self.selection_changed)
        self.grid.star_toggled.connect(self._starred)
        self.grid.opened.connect(lambda i: self.opened.emit(self.grid.items(), i))
        self.use_btn.clicked.connect(lambda: self.current_batch() and self.use_settings.emit(self.current_batch()))
        self.rerun_btn.clicked.connect(lambda: self.current_batch() and self.run_again.emit(self.current_batch()))
        self.export_btn.clicked.connect(self._export_dialog)
        self.delete_btn.clicked.connect(self._delete)
        self._batch = None
        self.refresh()

    def _lay_out(self):
        """The batch list at the left; the chosen batch's header, buttons and images at the right."""
        left = QWidget()
        ll = QVBoxLayout(left)
        ll.setContentsMargins(8, 8, 4, 8)
        ll.addWidget(self.search)
        ll.addWidget(self.starred_only)
        ll.addWidget(self.list, 1)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(4, 8, 8, 8)
        rl.addWidget(self.header)
        buttons = QHBoxLayout()
        for b in (self.use_btn, self.rerun_btn, self.export_btn):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.delete_btn)
        rl.addLayout(buttons)
        rl.addWidget(self.grid, 1)
        split = QSplitter()
        split.addWidget(left)
        split.addWidget(right)
        split.setStretchFactor(1, 1)
        split.setSizes([300, 700])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(split)

    def refresh(self, select_batch: int = None):
        """Reload the list; keep (or move to) the selected batch."""
        keep = select_batch if select_batch is not None else (self._batch.id if self._batch else None)
        self.list.blockSignals(True)
        self.list.clear()
        row = 0
        for i, b in enumerate(self.history.batches(self.search.text().strip(), self.starred_only.isChecked())):
            stars = sum(im.starred for im in b.images)
            when = time.strftime("%b %d %H:%M", time.localtime(b.created))
            ell = "\u2026" if len(b.prompt) > 48 else ""
            parts = [KINDS.get(b.kind, b.kind), plural(len(b.images), "image")] + ([f"\u2605 {stars}"] if stars else [])
            text = f"{b.prompt[:48]}{ell}\n" + " \u00b7 ".join(parts + [when])
            if b.id not in self._icons:
                self._icons[b.id] = mosaic_icon(self.history.batch(b.id).images)  # all images, not starred only
            item = QListWidgetItem(self._icons[b.id], text)
            item.setData(Qt.ItemDataRole.UserRole, b.id)
            item.setToolTip(b.prompt)
            self.list.addItem(item)
            if b.id == keep:
                row = i
        self.list.blockSignals(False)
        if self.list.count():
            self.list.setCurrentRow(row)
        self._show_current()

    def current_batch(self):
        return self._batch

    def _show_current(self):
        previous = (self._batch.id, self.grid.current) if self._batch is not None else (None, 0)
        item = self.list.currentItem()
        self._batch = self.history.batch(item.data(Qt.ItemDataRole.UserRole), self.starred_only.isChecked()) \
            if item else None
        b = self._batch
        for w in (self.use_btn, self.rerun_btn, self.export_btn, self.delete_btn):
            w.setEnabled(b is not None)
        if b is None:
            self.header.setText("<i>No batches yet. Generate one, and it appears here.</i>"
                                if not self.search.text() and not self.starred_only.isChecked()
                                else "<i>Nothing matches.</i>")
            self.grid.set_images([])
            return
        self.header.setText(f"<b>{b.prompt}</b><br><span style='color:gray'>{summary(b.recipe)} \u00b7 "
                            f"{b.seconds:.1f} s</span>")
        self.grid.set_images(b.images, select=previous[1] if previous[0] == b.id else 0)

    def _starred(self, image_id, starred):
        self.history.set_starred(image_id, starred)
        self.star_toggled.emit(image_id, starred)

    def set_starred(self, image_id, starred):
        self.grid.set_starred(image_id, starred)

    def export_to(self, folder) -> list:
        """Export the images shown (the batch's, or its starred ones with the filter on)."""
        if self._batch is None:
            return []
        paths = self.history.export([im.id for im in self.grid.items()], folder)
        self.message.emit(f"exported {len(paths)} image(s) to {folder}")
        return paths

    def _export_dialog(self):
        folder = QFileDialog.getExistingDirectory(self, "Export to folder")
        if folder:
            self.export_to(folder)

    def _delete(self):
        b = self._batch
        if b is None:
            return
        if QMessageBox.question(self, "Delete batch", f"Delete this batch of {len(b.images)} images and "
                                "their files?") != QMessageBox.StandardButton.Yes:
            return
        self.history.delete_batch(b.id)
        self._icons.pop(b.id, None)
        self._batch = None
        self.refresh()
        self.deleted.emit(b.id)
