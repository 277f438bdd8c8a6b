"""A batch as a grid of tiles, each large enough to judge.

While a batch is being made its tiles show previews that sharpen step by step; then the final
images. Keyboard: arrows move, S or Space stars, Enter opens the full view, Home/End jump. Mouse:
click selects, double-click opens the full view, the star toggles; hovering a final image shows a bar of
actions on it (star, vary subtly, vary strongly, explore from here, blend with..., open), which the grid
passes on as `action(index, name)` for the window to run as it runs the same menu actions.
"""

import math

from typing import Optional

from PySide6.QtCore import QEvent, QPointF, QRect, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QColor, QFont, QImage, QPainter, QPainterPath, QPen, QPixmap, QPolygonF
from PySide6.QtWidgets import QFrame, QGridLayout, QScrollArea, QSizePolicy, QToolTip, QWidget

TILE = 192  # smallest tile, pixels: a 32 x 32 demo image shown 6x or more, a 1024 image at a fifth
CAPTION_H = 22
ACCENT = QColor("#3d8bfd")
STAR = QColor("#f5b700")
# the hover bar: (action name, tooltip); the window maps each name to its menu action
BAR = [("star", "Star (S)"), ("subtle", "Vary subtly"), ("strong", "Vary strongly"),
       ("explore", "Explore new directions from here"), ("blend", "Blend with another favourite\u2026"),
       ("view", "Open full size (Enter)")]
BAR_H = 30


def transformation(image: QImage, size: QSize) -> Qt.TransformationMode:
    """Smooth, but nearest where a small image is enlarged 3x or more: the demo's 32-pixel pictures
    stay crisp pixels instead of a blur."""
    factor = min(size.width() / max(1, image.width()), size.height() / max(1, image.height()))
    return Qt.TransformationMode.FastTransformation if factor >= 3 else Qt.TransformationMode.SmoothTransformation


def draw_image(p: QPainter, image: QImage, target: QRect, smooth: bool = True) -> QRect:
    """Draw `image` centred in `target`, scaled to fit with its aspect ratio; returns where it went."""
    if image is None or image.isNull():
        return target
    s = min(target.width() / image.width(), target.height() / image.height())
    w, h = int(image.width() * s), int(image.height() * s)
    r = QRect(target.x() + (target.width() - w) // 2, target.y() + (target.height() - h) // 2, w, h)
    smooth = smooth and transformation(image, r.size()) == Qt.TransformationMode.SmoothTransformation
    p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, smooth)
    p.drawImage(r, image)
    return r


def star_polygon(center: QPointF, outer: float) -> QPolygonF:
    pts = []
    for k in range(10):
        r = outer if k % 2 == 0 else outer * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append(QPointF(center.x() + r * math.cos(a), center.y() + r * math.sin(a)))
    return QPolygonF(pts)


def draw_icon(p: QPainter, name: str, r: QRect, starred: bool = False):
    """The hover bar's icons, drawn as vectors so that they look the same with every font and scale."""
    c = QPointF(r.center())
    u = min(r.width(), r.height()) / 2 - 4  # half the icon's size
    pen = QPen(QColor("#f0f0f0"), 1.8)
    pen.setCapStyle(Qt.PenCapStyle.RoundCap)
    p.setPen(pen)
    p.setBrush(Qt.BrushStyle.NoBrush)
    if name == "star":
        p.setBrush(STAR if starred else Qt.BrushStyle.NoBrush)
        p.drawPolygon(star_polygon(c, u))
    elif name in ("subtle", "strong"):  # one small wave, or two big ones
        amp, rows = (0.25 * u, [0.0]) if name == "subtle" else (0.5 * u, [-0.35 * u, 0.35 * u])
        for dy in rows:
            path = QPainterPath(QPointF(c.x() - u, c.y() + dy))
            for k in range(1, 17):
                x = -u + 2 * u * k / 16
                path.lineTo(c.x() + x, c.y() + dy - amp * math.sin(math.pi * x / u * 1.5))
            p.drawPath(path)
    elif name == "explore":  # a compass needle
        p.drawEllipse(c, u, u)
        p.setBrush(QColor("#f0f0f0"))
        p.drawPolygon(QPolygonF([QPointF(c.x() + 0.6 * u, c.y() - 0.6 * u), QPointF(c.x() + 0.15 * u, c.y() + 0.15 * u),
                                 QPointF(c.x() - 0.15 * u, c.y() - 0.15 * u)]))
    elif name == "blend":  # two overlapping circles
        p.drawEllipse(QPointF(c.x() - 0.35 * u, c.y()), 0.65 * u, 0.65 * u)
        p.drawEllipse(QPointF(c.x() + 0.35 * u, c.y()), 0.65 * u, 0.65 * u)
    elif name == "view":  # the corners of a frame, pointing out
        d = 0.8 * u
        for sx, sy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
            corner = QPointF(c.x() + sx * d, c.y() + sy * d)
            p.drawLine(corner, corner - QPointF(sx * 0.6 * u, 0))
            p.drawLine(corner, corner - QPointF(0, sy * 0.6 * u))


class Tile(QWidget):
    clicked = Signal(object)  # self
    opened = Signal(object)
    star_clicked = Signal(object)
    action = Signal(object, str)  # self, a BAR name other than star and view

    def __init__(self, size: int = TILE, parent=None):
        super().__init__(parent)
        self.size_ = size
        self.image: Optional[QImage] = None
        self.item = None  # the history.Image shown, once final
        self.caption = ""
        self.badge = ""  # "preview 2/4", "waiting"
        self.starred = False
        self.selected = False
        self.final = False
        self.hover = False
        self._cache_key, self._pixmap = None, None
        self.setMouseTracking(True)
        self.set_size(size)
        self.setCursor(Qt.CursorShape.PointingHandCursor)
        self.setFocusPolicy(Qt.FocusPolicy.NoFocus)

    def _scaled(self, size: QSize) -> QPixmap:
        """The image scaled to the tile, cached until the image or the size changes."""
        key = (self.image.cacheKey(), size.width(), size.height(), self.final)
        if self._cache_key != key:
            # a quick preview is an eighth of the image's size: smooth it, only final pixels stay crisp
            mode = transformation(self.image, size) if self.final else Qt.TransformationMode.SmoothTransformation
            img = self.image.scaled(size, Qt.AspectRatioMode.KeepAspectRatio, mode)
            self._pixmap, self._cache_key = QPixmap.fromImage(img), key
        return self._pixmap

    def set_size(self, size: int):
        self.size_ = size
        self.setFixedSize(size, size + CAPTION_H)
        self.update()

    # geometry of the clickable parts
    def image_rect(self) -> QRect:
        return QRect(0, 0, self.size_, self.size_)

    def star_rect(self) -> QRect:
        return QRect(self.size_ - 40, 4, 36, 36)

    def bar_rect(self) -> QRect:
        return QRect(0, self.size_ - BAR_H, self.size_, BAR_H)

    def button_rects(self) -> list:
        """(name, rect) of the hover bar's buttons, centred along the bottom of the image."""
        w = min(34, self.size_ // len(BAR))
        x0 = (self.size_ - w * len(BAR)) // 2
        return [(name, QRect(x0 + k * w, self.size_ - BAR_H, w, BAR_H)) for k, (name, _) in enumerate(BAR)]

    def button_at(self, pos) -> str:
        if not (self.final and self.hover):
            return ""
        return next((name for name, r in self.button_rects() if r.contains(pos)), "")

    def paintEvent(self, event):
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        box = self.image_rect()
        p.fillRect(box, QColor("#1e1f22"))
        if self.image is not None and not self.image.isNull():
            pix = self._scaled(box.adjusted(2, 2, -2, -2).size())
            drawn = QRect(box.x() + (box.width() - pix.width()) // 2, box.y() + (box.height() - pix.height()) // 2,
                          pix.width(), pix.height())
            p.drawPixmap(drawn, pix)
            if not self.final:  # a preview: dim it a little and say so
                p.fillRect(drawn, QColor(30, 31, 34, 70))
        if self.badge:
            f = QFont(self.font())
            f.setPointSizeF(max(8.0, f.pointSizeF() - 1))
            p.setFont(f)
            tw = p.fontMetrics().horizontalAdvance(self.badge) + 12
            r = QRect(6, 6, tw, 20)
            path = QPainterPath()
            path.addRoundedRect(QRectF(r), 6, 6)
            p.fillPath(path, QColor(0, 0, 0, 150))
            p.setPen(QColor("#e8e8e8"))
            p.drawText(r, Qt.AlignmentFlag.AlignCenter, self.badge)
        if self.final:
            if self.starred or self.hover or self.selected:
                sr = self.star_rect()
                poly = star_polygon(QPointF(sr.center()), 13)
                p.setPen(QPen(QColor(0, 0, 0, 160), 1.5))
                p.setBrush(STAR if self.starred else QColor(255, 255, 255, 90))
                p.drawPolygon(poly)
            if self.hover:
                self._paint_bar(p)
        if self.selected:
            p.setPen(QPen(ACCENT, 4))
            p.setBrush(Qt.BrushStyle.NoBrush)
            p.drawRect(box.adjusted(2, 2, -2, -2))
        p.setPen(self.palette().text().color())
        cap = QRect(0, self.size_, self.size_, CAPTION_H)
        p.drawText(cap, Qt.AlignmentFlag.AlignCenter, p.fontMetrics().elidedText(self.caption, Qt.TextElideMode.ElideRight,
                                                                                 self.size_))

    def _paint_bar(self, p: QPainter):
        p.fillRect(self.bar_rect(), QColor(0, 0, 0, 165))
        under = self.mapFromGlobal(self.cursor().pos())
        for name, r in self.button_rects():
            if r.contains(under):
                path = QPainterPath()
                path.addRoundedRect(QRectF(r.adjusted(2, 3, -2, -3)), 5, 5)
                p.fillPath(path, QColor(255, 255, 255, 45))
            draw_icon(p, name, r.adjusted(4, 4, -4, -4), self.starred)

    def event(self, event):
        if event.type() == QEvent.Type.ToolTip:  # the bar's buttons are painted, so their tips are given here
            name = self.button_at(event.pos())
            if name:
                QToolTip.showText(event.globalPos(), dict(BAR)[name], self)
            else:
                QToolTip.hideText()
            return True
        return super().event(event)

    def mouseMoveEvent(self, event):
        if self.hover:
            self.update(self.bar_rect())  # the highlight follows the pointer

    def enterEvent(self, event):
        self.hover = True
        self.update()

    def leaveEvent(self, event):
        self.hover = False
        self.update()

    def mousePressEvent(self, event):
        if event.button() == Qt.MouseButton.RightButton:  # select, then the grid's menu acts on this image
            self.clicked.emit(self)
            return
        if event.button() != Qt.MouseButton.LeftButton:
            return
        pos = event.position().toPoint()
        button = self.button_at(pos)
        if button == "star" or (self.final and self.star_rect().contains(pos)):
            self.star_clicked.emit(self)
        elif button:
            self.clicked.emit(self)  # select first: the action runs on this image
            if button == "view":
                self.opened.emit(self)
            else:
                self.action.emit(self, button)
        else:
            self.clicked.emit(self)

    def mouseDoubleClickEvent(self, event):
        pos = event.position().toPoint()
        if self.final and not self.star_rect().contains(pos) and not self.button_at(pos):
            self.opened.emit(self)


class Grid(QScrollArea):
    """Tiles in rows that fit the width. Signals carry history image ids (final images only)."""
    selection_changed = Signal(object)  # history.Image or None
    star_toggled = Signal(int, bool)  # image id, starred
    opened = Signal(int)  # index into items()
    action = Signal(int, str)  # index, a hover-bar action name ("subtle", "strong", "explore", "blend")

    def __init__(self, tile: int = TILE, max_tile: int = 2 * TILE, parent=None):
        super().__init__(parent)
        self.min_tile, self.max_tile = tile, max_tile
        self.tile = tile
        self.tiles: list = []
        self.current = -1
        self.columns = 0
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        self.inner = QWidget()
        self.layout_ = QGridLayout(self.inner)
        self.layout_.setSpacing(12)
        self.layout_.setContentsMargins(12, 12, 12, 12)
        self.layout_.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignHCenter)
        self.inner.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setWidget(self.inner)

    # --- contents -------------------------------------------------------------------------------------

    def clear(self):
        for t in self.tiles:
            self.layout_.removeWidget(t)
            t.deleteLater()
        self.tiles = []
        self.current = -1
        self.columns = 0

    def _make(self, n: int):
        self.clear()
        for _ in range(n):
            t = Tile(self.tile, self.inner)
            t.clicked.connect(self._clicked)
            t.opened.connect(self._opened)
            t.star_clicked.connect(self._star_clicked)
            t.action.connect(lambda tile, name: self.action.emit(self.tiles.index(tile), name))
            self.tiles.append(t)
        self._relayout(force=True)

    def set_placeholders(self, n: int, captions=None):
        """Empty tiles for a batch being made."""
        self._make(n)
        for i, t in enumerate(self.tiles):
            t.badge = "waiting"
            t.caption = captions[i] if captions and i < len(captions) and captions[i] else ""
        self.selection_changed.emit(None)

    def set_previews(self, images: list, step: int, steps: int):
        for t, im in zip(self.tiles, images):
            if not t.final:
                t.image = im
                t.badge = f"preview {step}/{steps}"
                t.update()

    def set_images(self, items: list, select: int = 0):
        """Final images: history.Image rows (read from their PNG files)."""
        self._make(len(items))
        for t, it in zip(self.tiles, items):
            t.item = it
            t.image = QImage(str(it.path))
            if t.image.isNull():
                t.badge = "file missing"
            t.final = True
            t.starred = it.starred
            t.caption = it.label or f"seed {it.seed}"
        if items:
            self.select(min(max(select, 0), len(items) - 1))
        else:
            self.selection_changed.emit(None)

    def items(self) -> list:
        return [t.item for t in self.tiles if t.item is not None]

    def current_item(self):
        if 0 <= self.current < len(self.tiles):
            return self.tiles[self.current].item
        return None

    # --- selection and stars ------------------------------------------------------------------------

    def select(self, index: int):
        if not self.tiles:
            return
        index = min(max(index, 0), len(self.tiles) - 1)
        if 0 <= self.current < len(self.tiles):
            self.tiles[self.current].selected = False
            self.tiles[self.current].update()
        self.current = index
        t = self.tiles[index]
        t.selected = True
        t.update()
        self.ensureWidgetVisible(t, 12, 12)
        self.selection_changed.emit(t.item)

    def toggle_star(self, index: Optional[int] = None):
        index = self.current if index is None else index
        if not 0 <= index < len(self.tiles) or self.tiles[index].item is None:
            return
        t = self.tiles[index]
        self.set_starred(t.item.id, not t.starred)
        self.star_toggled.emit(t.item.id, t.starred)

    def set_starred(self, image_id: int, starred: bool):
        for t in self.tiles:
            if t.item is not None and t.item.id == image_id:
                t.starred = t.item.starred = starred
                t.update()

    def _clicked(self, tile):
        self.setFocus(Qt.FocusReason.MouseFocusReason)
        self.select(self.tiles.index(tile))

    def _opened(self, tile):
        self.opened.emit(self.tiles.index(tile))

    def _star_clicked(self, tile):
        self.setFocus(Qt.FocusReason.MouseFocusReason)
        i = self.tiles.index(tile)
        self.select(i)
        self.toggle_star(i)

    # --- keyboard and layout ------------------------------------------------------------------------

    def keyPressEvent(self, event):
        k = event.key()
        cols = max(1, self.columns)
        moves = {Qt.Key.Key_Left: -1, Qt.Key.Key_Right: 1, Qt.Key.Key_Up: -cols, Qt.Key.Key_Down: cols}
        if k in moves and self.tiles and not event.modifiers() & ~Qt.KeyboardModifier.KeypadModifier:
            self.select(self.current + moves[k] if self.current >= 0 else 0)
        elif k == Qt.Key.Key_Home and self.tiles:
            self.select(0)
        elif k == Qt.Key.Key_End and self.tiles:
            self.select(len(self.tiles) - 1)
        elif k in (Qt.Key.Key_S, Qt.Key.Key_Space) and not event.modifiers() & Qt.KeyboardModifier.ControlModifier:
            self.toggle_star()
        elif k in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not event.modifiers():
            if self.current_item() is not None:
                self.opened.emit(self.current)
        else:
            super().keyPressEvent(event)

    def resizeEvent(self, event):
        super().resizeEvent(event)
        self._relayout()

    def _relayout(self, force=False):
        """Arrange the tiles in the column count that shows them largest without scrolling (between
        the grid's smallest and largest tile size); too many to fit: smallest size, and scroll."""
        m, sp = 12, self.layout_.spacing()
        W, H = self.viewport().width() - 2 * m, self.viewport().height() - 2 * m
        n = max(1, len(self.tiles))
        cols, size = 1, 0
        for c in range(1, n + 1):
            rows = -(-n // c)
            s = min((W - (c - 1) * sp) / c, (H - (rows - 1) * sp) / rows - CAPTION_H)
            if s > size:
                cols, size = c, s
        if size < self.min_tile:
            size = self.min_tile
            cols = max(1, min(n, (W + sp) // (size + sp)))
        size = int(min(size, self.max_tile))
        if cols == self.columns and size == self.tile and not force:
            return
        self.columns, self.tile = cols, size
        for t in self.tiles:
            self.layout_.removeWidget(t)
        for i, t in enumerate(self.tiles):
            t.set_size(size)
            self.layout_.addWidget(t, i // cols, i % cols)
            t.show()

    def sizeHint(self):
        return QSize(2 * (self.min_tile + 12) + 24, self.min_tile + CAPTION_H + 24)
