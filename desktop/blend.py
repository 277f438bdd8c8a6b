"""The blend dialog: favourite A, another favourite B of the same prompt, and a slider for alpha from
-0.5 (away from B) through 0 (A) and 1 (B's context) to 1.5 (beyond it).

A blend keeps A's noise, as the paper's contextual blending does, and moves A's enriched text tokens
toward B's during the first steps: at alpha 1 the image has B's context on A's noise, which is B's look
in A's layout, not B itself (B's own row of the blend batch is B)."""

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QIcon, QImage, QPixmap
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QFormLayout, QHBoxLayout, QLabel,
                               QSlider, QVBoxLayout)

from .refine import ALPHA_RANGE

ROW = (-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25)  # a blend row: from beyond A, through A, to past B's context
from .viewer import ImageView


def alpha_words(a: float) -> str:
    if a < 0:
        return "A, pushed away from B's context"
    if a == 0:
        return "A"
    if a < 0.5:
        return "A, a little of B's context"
    if a == 0.5:
        return "halfway to B's context"
    if a < 1:
        return "mostly B's context, A's layout"
    if a == 1:
        return "B's context on A's noise"
    return "beyond B's context"


class BlendDialog(QDialog):
    def __init__(self, a, candidates: list, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Blend two favourites")
        self.a = a
        self.candidates = candidates
        self.view_a, self.view_b = ImageView(), ImageView()
        for v in (self.view_a, self.view_b):
            v.setMinimumSize(260, 260)
        self.resize(640, 560)
        self.view_a.set_image(QImage(str(a.path)))
        self.b_choice = QComboBox()
        self.b_choice.setIconSize(QSize(40, 40))
        for im in candidates:
            self.b_choice.addItem(QIcon(QPixmap.fromImage(QImage(str(im.path)))),
                                  f"batch {im.batch_id}, image {im.index + 1} (seed {im.seed})", im.id)
        self.b_choice.currentIndexChanged.connect(self._b_changed)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(int(ALPHA_RANGE[0] * 100), int(ALPHA_RANGE[1] * 100))
        self.slider.setSingleStep(5)
        self.slider.setPageStep(25)
        self.slider.setTickInterval(50)
        self.slider.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.slider.setValue(50)
        self.alpha_label = QLabel()
        self.slider.valueChanged.connect(self._alpha_changed)
        views = QHBoxLayout()
        for title, v in (("A", self.view_a), ("B", self.view_b)):
            col = QVBoxLayout()
            lab = QLabel(f"<b>{title}</b>")
            lab.setAlignment(Qt.AlignmentFlag.AlignCenter)
            col.addWidget(lab)
            col.addWidget(v, 1)
            views.addLayout(col)
        form = self._form()
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.ok = buttons.addButton("Blend", QDialogButtonBox.ButtonRole.AcceptRole)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(views, 1)
        lay.addLayout(form)
        lay.addWidget(QLabel("<span style='color:gray'>The blend keeps A's noise and moves its enriched text "
                             "tokens toward B's in the first steps: content changes, not a cross-fade.</span>"))
        lay.addWidget(buttons)
        self._b_changed(0)
        self._alpha_changed(self.slider.value())

    def _form(self) -> QFormLayout:
        """B's choice, the alpha slider with its scale and words, and the row option."""
        form = QFormLayout()
        form.addRow("B", self.b_choice)
        scale = QHBoxLayout()
        for text, stretch in (("-0.5", 1), ("0 = A", 2), ("0.5", 2), ("1 = B's context", 2), ("1.5", 1)):
            lab = QLabel(text)
            lab.setObjectName("hint")
            lab.setAlignment(Qt.AlignmentFlag.AlignCenter if stretch == 2 else
                             (Qt.AlignmentFlag.AlignLeft if text == "-0.5" else Qt.AlignmentFlag.AlignRight))
            scale.addWidget(lab, stretch)
        form.addRow("Alpha", self.slider)
        form.addRow("", scale)
        form.addRow("", self.alpha_label)
        self.row = QCheckBox(f"a row of {len(ROW)} instead: " + ", ".join(f"{a:g}" for a in ROW))
        self.row.setToolTip("One batch that walks from A toward B's context and past it, rather than one guess")
        self.row.setChecked(True)
        self.row.toggled.connect(self.slider.setDisabled)
        self.slider.setDisabled(True)
        form.addRow("", self.row)
        return form

    @property
    def alpha(self) -> float:
        return self.slider.value() / 100

    @property
    def alphas(self) -> list:
        """The blend weights of the batch: the row, or the slider's one."""
        return list(ROW) if self.row.isChecked() else [self.alpha]

    @property
    def b(self):
        i = self.b_choice.currentIndex()
        return self.candidates[i] if 0 <= i < len(self.candidates) else None

    def _b_changed(self, _):
        if self.b is not None:
            self.view_b.set_image(QImage(str(self.b.path)))

    def _alpha_changed(self, v):
        self.alpha_label.setText(f"\u03b1 = {v / 100:.2f} \u2014 {alpha_words(v / 100)}")
