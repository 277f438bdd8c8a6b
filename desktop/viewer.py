"""Full-size view of one image (arrows move through its batch, S stars) and a side-by-side comparison
of two images with their recipes, differences in bold."""

import html
import time

from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QImage, QPainter
from PySide6.QtWidgets import (QDialog, QHBoxLayout, QLabel, QPushButton, QSizePolicy, QVBoxLayout, QWidget)

from mlx_crepulse import metadata

from .controls import diversity_words, tick_of
from .grid import draw_image
from .models import label

KINDS = {"generate": "new batch", "vary-subtle": "varied subtly", "vary-strong": "varied strongly",
         "explore": "new directions", "blend": "blend", "upscale": "upscaled", "rerun": "run again",
         "twin": "same seeds, diversity off"}


def recipe_fields(recipe: dict, image=None) -> list:
    """(name, value) pairs a person reads: model, size, steps, seed, diversity, ..."""
    app = recipe.get("app", {})
    rows = [("model", recipe.get("model", "?") + (f" ({recipe['quantize']}-bit)" if recipe.get("quantize") else "")),
            ("made by", KINDS.get(app.get("kind"), app.get("kind", "?"))),
            ("size", f"{recipe.get('width')} \u00d7 {recipe.get('height')}"),
            ("steps", str(recipe.get("steps"))),
            ("seed", str(image.seed if image is not None else recipe.get("seed")) +
             (" (custom noise)" if app.get("kind") in ("vary-subtle", "vary-strong", "blend") else "")),
            ("diversity", diversity_text(recipe))]
    if recipe.get("guidance") is not None:
        rows.append(("guidance", f"{recipe['guidance']:g}"))
    if recipe.get("blend") and app.get("kind") == "blend":
        rows.append(("blend", ", ".join(f"{a:g}" for a in recipe["blend"]["alphas"])))
    if recipe.get("strength") is not None:
        rows.append(("strength", f"{recipe['strength']:g}"))
    if app.get("reference_size"):
        rows.append(("pushed from", f"{app['reference_size']} images seen"))
    return rows


def diversity_text(recipe: dict) -> str:
    """'moderate (scale 5.7e+08)', 'off', or the method's own description for other methods."""
    method = recipe.get("method")
    d = recipe.get("app", {}).get("diversity", recipe.get("diversity"))
    if method is None:
        return "off"
    if isinstance(method, dict) and method.get("name") == "contextual" and d is not None:
        return f"{diversity_words(tick_of(d))} (scale {method['scale']:.2g})"
    return metadata.describe_method(method)


def summary(recipe: dict, image=None) -> str:
    """One line: how the batch was made, then its settings, then the model."""
    f = dict(recipe_fields(recipe, image))
    parts = [f.pop("made by")] + [f"{k} {v}" for k, v in f.items() if k != "model"]
    return " \u00b7 ".join(parts + [label(recipe.get("model", "?"))])


class ImageView(QWidget):
    """An image scaled to fit, aspect kept; small images are enlarged with smooth scaling."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.image = QImage()
        self.setMinimumSize(256, 256)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def set_image(self, image: QImage):
        self.image = image
        self.update()

    def paintEvent(self, event):
        p = QPainter(self)
        p.fillRect(self.rect(), self.palette().window().color().darker(150))
        if not self.image.isNull():
            draw_image(p, self.image, self.rect().adjusted(8, 8, -8, -8))

    def sizeHint(self):
        return QSize(640, 640)


class Viewer(QDialog):
    """One image at full size; Left/Right move through `items`, S or Space stars, Esc closes."""
    star_toggled = Signal(int, bool)

    def __init__(self, history, items: list, index: int = 0, parent=None):
        super().__init__(parent)
        self.history, self.items, self.index = history, list(items), index
        self.setWindowTitle("Image")
        self.resize(760, 820)
        self.view = ImageView()
        self.info = QLabel()
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.prev_btn = QPushButton("\u25c0")
        self.next_btn = QPushButton("\u25b6")
        self.star_btn = QPushButton()
        close = QPushButton("Close")
        for b in (self.prev_btn, self.next_btn, self.star_btn, close):
            b.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.prev_btn.clicked.connect(lambda: self.move(-1))
        self.next_btn.clicked.connect(lambda: self.move(1))
        self.star_btn.clicked.connect(self.toggle_star)
        close.clicked.connect(self.accept)
        row = QHBoxLayout()
        row.addWidget(self.prev_btn)
        row.addWidget(self.next_btn)
        row.addWidget(self.star_btn)
        row.addStretch(1)
        row.addWidget(close)
        lay = QVBoxLayout(self)
        lay.addWidget(self.view, 1)
        lay.addWidget(self.info)
        lay.addLayout(row)
        self.show_current()

    def keyPressEvent(self, event):
        k = event.key()
        if k in (Qt.Key.Key_Left, Qt.Key.Key_Up):
            self.move(-1)
        elif k in (Qt.Key.Key_Right, Qt.Key.Key_Down):
            self.move(1)
        elif k in (Qt.Key.Key_S, Qt.Key.Key_Space):
            self.toggle_star()
        elif k == Qt.Key.Key_Home:
            self.move(-len(self.items))
        elif k == Qt.Key.Key_End:
            self.move(len(self.items))
        else:
            super().keyPressEvent(event)  # Esc closes

    @property
    def current(self):
        return self.items[self.index] if self.items else None

    def move(self, delta: int):
        if self.items:
            self.index = min(max(self.index + delta, 0), len(self.items) - 1)
            self.show_current()

    def toggle_star(self):
        im = self.current
        if im is None:
            return
        im.starred = not im.starred
        self.history.set_starred(im.id, im.starred)
        self.star_toggled.emit(im.id, im.starred)
        self.show_current()

    def show_current(self):
        im = self.current
        if im is None:
            return
        self.view.set_image(QImage(str(im.path)))
        b = self.history.batch(im.batch_id)
        rows = recipe_fields(b.recipe, im)
        table = "".join(f"<tr><td style='color:gray;padding-right:10px'>{html.escape(k)}</td>"
                        f"<td>{html.escape(v)}</td></tr>" for k, v in rows)
        dot = " \u00b7 "
        parts = [f"image {self.index + 1} of {len(self.items)}"] + ([html.escape(im.label)] if im.label else []) + [
            f"{im.width} \u00d7 {im.height} px", time.strftime("%Y-%m-%d %H:%M", time.localtime(b.created))]
        self.info.setText(f"<b>{html.escape(b.prompt)}</b><br>{dot.join(parts)}<table>{table}</table>")
        self.star_btn.setText("\u2605 Starred" if im.starred else "\u2606 Star")
        self.prev_btn.setEnabled(self.index > 0)
        self.next_btn.setEnabled(self.index < len(self.items) - 1)
        self.setWindowTitle(f"{b.prompt[:60]} \u2014 image {self.index + 1}")


class Compare(QDialog):
    """Two images side by side with their recipes; what differs is in bold."""

    def __init__(self, history, a, b, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Compare")
        self.resize(1100, 760)
        self.a, self.b = a, b
        ba, bb = history.batch(a.batch_id), history.batch(b.batch_id)
        fa, fb = dict(recipe_fields(ba.recipe, a)), dict(recipe_fields(bb.recipe, b))
        fa["prompt"], fb["prompt"] = ba.prompt, bb.prompt
        self.views = []
        row = QHBoxLayout()
        for im, mine, other in ((a, fa, fb), (b, fb, fa)):
            col = QVBoxLayout()
            v = ImageView()
            v.set_image(QImage(str(im.path)))
            self.views.append(v)
            col.addWidget(v, 1)
            lines = []
            for k in ["prompt"] + [k for k in mine if k != "prompt"]:
                val = html.escape(str(mine.get(k, "")))
                if mine.get(k) != other.get(k):
                    val = f"<b>{val}</b>"
                lines.append(f"<tr><td style='color:gray;padding-right:10px'>{k}</td><td>{val}</td></tr>")
            star = "\u2605 " if im.starred else ""
            label = QLabel(f"{star}image {im.index + 1} of batch {im.batch_id}<table>{''.join(lines)}</table>")
            label.setWordWrap(True)
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            col.addWidget(label)
            row.addLayout(col, 1)
        lay = QVBoxLayout(self)
        lay.addLayout(row, 1)
        close = QPushButton("Close")
        close.clicked.connect(self.accept)
        bottom = QHBoxLayout()
        bottom.addStretch(1)
        bottom.addWidget(close)
        lay.addLayout(bottom)
