"""The generation form: prompt, model and precision, batch size, the diversity control, and an
"advanced" fold with steps, size, seed and low-memory mode. Its values are remembered (QSettings)."""

from pathlib import Path
from typing import Optional

from PySide6.QtCore import QEvent, Qt, Signal
from PySide6.QtGui import QKeySequence, QTextCursor
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QHBoxLayout,
                               QLabel, QLineEdit, QListWidget, QListWidgetItem, QMenu,
                               QPlainTextEdit, QPushButton, QSizePolicy, QSlider, QSpinBox, QToolButton,
                               QVBoxLayout, QWidget)

from mlx_crepulse import DEFAULT_DIVERSITY, Recipe, Repulsion, random_seed

from . import models

ASPECTS = [("model default", None), ("square 1:1", 1.0), ("landscape 4:3", 4 / 3), ("portrait 3:4", 3 / 4),
           ("wide 16:9", 16 / 9), ("tall 9:16", 9 / 16)]
DIVERSITY_TICKS = 9  # slider 0 = off, 1..9 = diversity 0, 1/8, .. 1, so that the default 0.5 is a tick (the middle)


def diversity_of(tick: int) -> Optional[float]:
    """Slider position -> the 0..1 diversity on the model's recommended range; None when off."""
    return None if tick <= 0 else round((tick - 1) / (DIVERSITY_TICKS - 1), 4)


def tick_of(diversity: Optional[float]) -> int:
    return 0 if diversity is None else 1 + round(float(diversity) * (DIVERSITY_TICKS - 1))


DEFAULT_TICK = tick_of(DEFAULT_DIVERSITY)  # the CLI's default, so one seed makes the same batch in both


WORDS = ["faint", "subtle", "gentle", "mild", "moderate", "lively", "strong", "bold", "wild"]  # one a tick


def diversity_words(tick: int) -> str:
    if tick <= 0:
        return "off \u2014 plain seeds"
    return WORDS[tick - 1]


class Form(QWidget):
    generate_requested = Signal()
    model_changed = Signal()
    changed = Signal()  # a setting that changes how long a batch takes
    download_requested = Signal(str)  # source

    def __init__(self, settings, parent=None):
        super().__init__(parent)
        self.settings = settings
        keys = QKeySequence("Ctrl+Return").toString(QKeySequence.SequenceFormat.NativeText)
        self._make_prompt(keys)
        self._make_model()
        ends = self._make_batch_and_diversity()
        self._make_advanced()
        self._make_generate(keys)
        self._lay_out(ends)
        self.model.currentIndexChanged.connect(self._model_index_changed)
        self.precision.currentIndexChanged.connect(lambda _: self.model_changed.emit())
        self._last_model_index = 0
        self._diversity_changed(self.diversity.value())
        for spin in (self.n, self.steps, self.width_, self.height_, self.true_cfg, self.diversity):
            spin.valueChanged.connect(lambda _: self.changed.emit())
        self.model_changed.connect(self.changed)


    def _make_prompt(self, keys):
        self.recent_prompts = lambda: []  # the window sets where recent prompts come from (the history)
        self.recent = QToolButton()
        self.recent.setText("Recent \u25be")
        self.recent.setStyleSheet("QToolButton::menu-indicator { image: none; width: 0px; }")  # the \u25be says it
        self.recent.setToolTip("Prompts used before, the latest first")
        self.recent.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.recent.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.recent.setMenu(QMenu(self.recent))
        self.recent.menu().aboutToShow.connect(self._fill_recent)
        self.prompt = QPlainTextEdit()
        self.prompt.setPlaceholderText(f"Describe an image \u2014 {keys} to generate")
        self.prompt.setTabChangesFocus(True)
        self.prompt.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.prompt.setFixedHeight(96)
        self.prompt.installEventFilter(self)  # Ctrl+Enter in the prompt box generates, not a new line

    def _fill_recent(self):
        menu = self.recent.menu()
        menu.clear()
        prompts = self.recent_prompts()
        for text in prompts:
            shown = text if len(text) <= 60 else text[:57] + "\u2026"
            a = menu.addAction(shown.replace("&", "&&"))
            a.setToolTip(text)
            a.triggered.connect(lambda _=False, t=text: self.use_prompt(t))
        if not prompts:
            menu.addAction("No prompts yet").setEnabled(False)

    def use_prompt(self, text: str):
        self.prompt.setPlainText(text)
        self.prompt.setFocus()
        self.prompt.moveCursor(QTextCursor.MoveOperation.End)

    def _make_model(self):
        self.model = QComboBox()
        for source, text in models.CHOICES:
            self.model.addItem(text, source)
        self.model.addItem("Choose a folder\u2026", "__folder__")
        self.precision = QComboBox()
        for bits, text in models.PRECISIONS:
            self.precision.addItem(text, bits)
        self.model_note = QLabel()
        self.model_note.setWordWrap(True)
        self.model_note.setObjectName("modelNote")
        self.download = QPushButton("Download")
        self.download.setVisible(False)
        self.download.clicked.connect(lambda: self.download_requested.emit(self.source()))

    def _make_batch_and_diversity(self):
        self.n = QSpinBox()
        self.n.setRange(1, 16)
        self.n.setValue(4)
        self.n.setSuffix(" images")

        self.diversity = QSlider(Qt.Orientation.Horizontal)
        self.diversity.setRange(0, DIVERSITY_TICKS)
        self.diversity.setPageStep(1)
        self.diversity.setTickPosition(QSlider.TickPosition.TicksBelow)
        self.diversity.setValue(DEFAULT_TICK)
        self.diversity_label = QLabel()
        self.diversity.valueChanged.connect(self._diversity_changed)
        ends = QHBoxLayout()
        for text, align in (("off", Qt.AlignmentFlag.AlignLeft), (diversity_words(DEFAULT_TICK), Qt.AlignmentFlag.AlignCenter),
                            (diversity_words(DIVERSITY_TICKS), Qt.AlignmentFlag.AlignRight)):
            lab = QLabel(text)
            lab.setObjectName("hint")
            lab.setAlignment(align)
            ends.addWidget(lab, 1)
        return ends

    def _make_advanced(self):
        """The advanced fold: steps, size, seed, low-memory mode."""
        self.advanced_button = QToolButton()
        self.advanced_button.setText("Advanced")
        self.advanced_button.setCheckable(True)
        self.advanced_button.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_button.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_button.setStyleSheet("QToolButton { border: none; font-weight: 600; }")
        self.advanced = QWidget()
        self.steps = QSpinBox()
        self.steps.setRange(0, 100)
        self.steps.setSpecialValueText("model default")
        self.width_ = QSpinBox()
        self.height_ = QSpinBox()
        for s in (self.width_, self.height_):
            s.setRange(0, 2048)
            s.setSingleStep(16)
            s.setSpecialValueText("default")
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 100)
        self.seed.setSpecialValueText("random")
        self.seed.setValue(-1)
        self.low_memory = QCheckBox("Low memory mode")
        self.low_memory.setToolTip("Free the text encoders after each new prompt (slower, needs less memory)")
        self.negative = QLineEdit()
        self.negative.setPlaceholderText("what to avoid (with true CFG above 1)")
        self.guidance = QDoubleSpinBox()
        self.true_cfg = QDoubleSpinBox()
        for spin, tip in ((self.guidance, "FLUX.1-dev's embedded guidance (3.5)"),
                          (self.true_cfg, "true classifier-free guidance: 1 is off, above 1 uses the negative "
                                          "prompt and takes two passes a step")):
            spin.setRange(0, 30)
            spin.setSingleStep(0.5)
            spin.setSpecialValueText("model default")
            spin.setToolTip(tip)
        self.aspect = QComboBox()
        for text, ratio in ASPECTS:
            self.aspect.addItem(text, ratio)
        self.aspect.setToolTip("Set the size to this shape at the model's own size")
        self.aspect.activated.connect(self._aspect_chosen)
        adv = QFormLayout(self.advanced)
        adv.setContentsMargins(12, 0, 0, 0)
        adv.addRow("Negative", self.negative)
        adv.addRow("Guidance", self.guidance)
        adv.addRow("True CFG", self.true_cfg)
        adv.addRow("Steps", self.steps)
        adv.addRow("Shape", self.aspect)
        adv.addRow("Size", self._size_row())
        adv.addRow("LoRAs", self._make_loras())
        adv.addRow("Seed", self._seed_row())
        adv.addRow(self.low_memory)
        self.advanced.setVisible(False)
        self.advanced_button.toggled.connect(self._fold)

    def _make_loras(self) -> QWidget:
        """A list of LoRAs, each with its scale: a .safetensors file or a Hub file (owner/name:file)."""
        box = QWidget()
        lay = QVBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        self.lora_list = QListWidget()
        self.lora_list.setMaximumHeight(72)
        self.lora_ref = QLineEdit()
        self.lora_ref.setPlaceholderText("owner/name:file.safetensors, or Add for a file")
        self.lora_scale = QDoubleSpinBox()
        self.lora_scale.setRange(-4, 4)
        self.lora_scale.setSingleStep(0.05)
        self.lora_scale.setValue(1.0)
        self.lora_scale.setToolTip("The selected LoRA's scale (0 is as if it were not there)")
        add, remove = QPushButton("Add\u2026"), QPushButton("Remove")
        add.clicked.connect(self._add_lora)
        remove.clicked.connect(lambda: self.lora_list.takeItem(self.lora_list.currentRow()))
        self.lora_list.currentItemChanged.connect(
            lambda item, _: item is not None and self.lora_scale.setValue(item.data(Qt.ItemDataRole.UserRole)[1]))
        self.lora_scale.valueChanged.connect(self._lora_scale_changed)
        row = QHBoxLayout()
        for w in (self.lora_ref, add, self.lora_scale, remove):
            row.addWidget(w, 1 if w is self.lora_ref else 0)
        lay.addWidget(self.lora_list)
        lay.addLayout(row)
        return box

    def _add_lora(self, path: Optional[str] = None, scale: float = 1.0):
        ref = path or self.lora_ref.text().strip() or QFileDialog.getOpenFileName(
            self, "A LoRA", "", "LoRA (*.safetensors)")[0]
        if ref:
            hub = not Path(ref).expanduser().exists() and ":" in ref  # owner/name:file.safetensors
            item = QListWidgetItem(f"{ref if hub else Path(ref).name}  \u00d7{scale:g}")
            item.setData(Qt.ItemDataRole.UserRole, (ref, float(scale)))
            item.setToolTip(ref)
            self.lora_list.addItem(item)
            self.lora_list.setCurrentItem(item)
            self.lora_ref.clear()

    def _lora_scale_changed(self, value):
        item = self.lora_list.currentItem()
        if item is not None:
            ref = item.data(Qt.ItemDataRole.UserRole)[0]
            item.setData(Qt.ItemDataRole.UserRole, (ref, float(value)))
            item.setText(item.text().rsplit("\u00d7", 1)[0] + f"\u00d7{value:g}")

    def loras(self) -> list:
        """The LoRAs to apply: (file or Hub reference, scale), in the list's order."""
        return [tuple(self.lora_list.item(i).data(Qt.ItemDataRole.UserRole)) for i in range(self.lora_list.count())]

    def _size_row(self):
        size = QHBoxLayout()
        times = QLabel("\u00d7")
        times.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)
        for spin in (self.width_, self.height_):
            spin.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        size.addWidget(self.width_, 1)
        size.addWidget(times)
        size.addWidget(self.height_, 1)
        return size

    def _seed_row(self):
        row = QHBoxLayout()
        row.addWidget(self.seed, 1)
        dice = QToolButton()
        dice.setText("Random")
        dice.setToolTip("A new random seed for every batch")
        dice.clicked.connect(lambda: self.seed.setValue(-1))
        row.addWidget(dice)
        return row

    def set_model_size(self, width: int, height: int):
        """The model's own size, which the shape presets keep the area of."""
        self._model_size = (width, height)

    def _aspect_chosen(self, index):
        ratio = self.aspect.itemData(index)
        if ratio is None:  # the model's default
            self.width_.setValue(0)
            self.height_.setValue(0)
            return
        w0, h0 = getattr(self, "_model_size", (1024, 1024))
        area = w0 * h0
        width = max(16, round((area * ratio) ** 0.5 / 16) * 16)
        self.width_.setValue(width)
        self.height_.setValue(max(16, round(area / width / 16) * 16))

    def _make_generate(self, keys):
        self.generate = QPushButton("Generate")
        self.generate.setDefault(True)
        self.generate.setToolTip(f"Generate a batch ({keys})")
        self.generate.setMinimumHeight(36)
        self.generate.setObjectName("primary")
        self.generate.clicked.connect(self.generate_requested)
        self.estimate = QLabel()
        self.estimate.setObjectName("hint")
        self.estimate.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.estimate.setToolTip("From this model's speed on the batches in your history")

    def _lay_out(self, ends):
        lay = QVBoxLayout(self)
        lay.setContentsMargins(14, 14, 14, 14)
        lay.setSpacing(6)
        prow = QHBoxLayout()
        prow.addWidget(self._title("Prompt"))
        prow.addStretch(1)
        prow.addWidget(self.recent)
        lay.addLayout(prow)
        lay.addWidget(self.prompt)
        lay.addSpacing(6)
        lay.addWidget(self._title("Model"))
        mrow = QHBoxLayout()
        mrow.addWidget(self.model, 3)
        mrow.addWidget(self.precision, 2)
        lay.addLayout(mrow)
        lay.addWidget(self.model_note)
        lay.addWidget(self.download)
        lay.addSpacing(6)
        lay.addWidget(self._title("Batch"))
        lay.addWidget(self.n)
        lay.addSpacing(6)
        drow = QHBoxLayout()
        drow.addWidget(self._title("Diversity"))
        drow.addStretch(1)
        drow.addWidget(self.diversity_label)
        lay.addLayout(drow)
        lay.addWidget(self.diversity)
        lay.addLayout(ends)
        lay.addSpacing(6)
        lay.addWidget(self.advanced_button)
        lay.addWidget(self.advanced)
        lay.addStretch(1)
        lay.addWidget(self.generate)
        lay.addWidget(self.estimate)

    def eventFilter(self, obj, event):
        if obj is self.prompt and event.type() in (QEvent.Type.KeyPress, QEvent.Type.ShortcutOverride):
            if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and \
                    event.modifiers() & Qt.KeyboardModifier.ControlModifier:
                if event.type() == QEvent.Type.KeyPress:
                    self.generate_requested.emit()
                event.accept()
                return True
        return super().eventFilter(obj, event)

    @staticmethod
    def _title(text):
        lab = QLabel(text)
        lab.setObjectName("section")
        return lab

    # --- values -------------------------------------------------------------------------------------

    def source(self) -> str:
        return self.model.currentData()

    def quantize(self) -> Optional[int]:
        return self.precision.currentData() if self.source() != models.DEMO else None

    def diversity_value(self) -> Optional[float]:
        return diversity_of(self.diversity.value())

    def set_source(self, source: str):
        """Select a model; a folder not in the list yet is added to it."""
        i = self.model.findData(source)
        if i < 0:  # inserted with signals off: the shifted "Choose a folder" item must not fire again
            i = self.model.count() - 1
            blocked = self.model.blockSignals(True)
            self.model.insertItem(i, models.label(source), source)
            self.model.setItemData(i, source, Qt.ItemDataRole.ToolTipRole)
            self.model.blockSignals(blocked)
        self.model.setCurrentIndex(i)

    def prompt_text(self) -> str:
        return self.prompt.toPlainText().strip()

    def recipe(self, prompt: Optional[str] = None) -> Recipe:
        """The form's values as a Recipe (None: the model's default; no seed: a new one each time), with
        the prompt box's text unless `prompt` is given. The slider's lowest "on" position is the low end
        of the model's range, not plain seeds; one image has nothing to push apart, so it is left plain."""
        diversity = self.diversity_value() if self.n.value() >= 2 else None
        return Recipe(self.prompt_text() if prompt is None else prompt, n=self.n.value(), model=self.source(), quantize=self.quantize(),
                      negative_prompt=self.negative.text().strip() or None, guidance=self.guidance.value() or None,
                      true_cfg=self.true_cfg.value() or None,
                      steps=self.steps.value() or None, width=self.width_.value() or None,
                      height=self.height_.value() or None, diversity=diversity,
                      method=Repulsion() if diversity is not None else None,
                      seed=self.seed.value() if self.seed.value() >= 0 else random_seed(self.n.value()))

    def load_recipe(self, recipe: dict, defaults: Optional[dict] = None):
        """Put a stored batch's prompt, model, batch size and diversity into the form, and its steps and
        size where they differ from the model's `defaults` (when known). The seed stays random: a fixed
        seed left in the form made every later batch the same one (Run again makes that batch exactly)."""
        self.prompt.setPlainText(recipe.get("prompt", ""))
        if recipe.get("model"):
            self.set_source(recipe["model"])
        i = self.precision.findData(recipe.get("quantize"))
        if i >= 0:
            self.precision.setCurrentIndex(i)
        self.n.setValue(int(recipe.get("n") or 4))
        for spin, key in ((self.steps, "steps"), (self.width_, "width"), (self.height_, "height"),
                          (self.guidance, "guidance"), (self.true_cfg, "true_cfg")):
            value = recipe.get(key) or 0
            spin.setValue(0 if defaults is None or value == defaults.get(key) else value)
        self.negative.setText(recipe.get("negative_prompt") or "")
        self.lora_list.clear()
        for l in recipe.get("loras") or []:
            if isinstance(l, dict) and l.get("source"):
                self._add_lora(l["source"], l.get("scale", 1.0))
        self.seed.setValue(-1)
        app = recipe.get("app", {})
        if "diversity" in app:
            self.diversity.setValue(tick_of(app["diversity"]))
        elif recipe.get("method") is None:
            self.diversity.setValue(0)

    def set_busy(self, busy: bool):
        """While a batch runs, Generate queues the next one."""
        self.generate.setText("Add to queue" if busy else "Generate")

    def _fold(self, open_: bool):
        self.advanced.setVisible(open_)
        self.advanced_button.setArrowType(Qt.ArrowType.DownArrow if open_ else Qt.ArrowType.RightArrow)

    def _diversity_changed(self, tick):
        self.diversity_label.setText(diversity_words(tick))

    def _model_index_changed(self, index):
        if self.model.itemData(index) == "__folder__":
            folder = QFileDialog.getExistingDirectory(self, "A model folder (diffusers layout)")
            self.model.blockSignals(True)
            if folder:
                self.model.blockSignals(False)
                self.set_source(folder)
                return
            self.model.setCurrentIndex(self._last_model_index)
            self.model.blockSignals(False)
            return
        self._last_model_index = index
        self.precision.setEnabled(self.source() != models.DEMO)
        self.model_changed.emit()

    def show_model_state(self, note: str, warn: bool, downloadable: bool):
        self.model_note.setText(note)
        self.model_note.setVisible(bool(note))
        self.model_note.setProperty("warn", warn)
        self.model_note.style().unpolish(self.model_note)
        self.model_note.style().polish(self.model_note)
        self.download.setVisible(downloadable)

    # --- preferences --------------------------------------------------------------------------------

    def save(self):
        s = self.settings
        s.setValue("form/model", self.source())
        s.setValue("form/precision", self.precision.currentIndex())
        s.setValue("form/n", self.n.value())
        s.setValue("form/diversity", self.diversity.value())
        s.setValue("form/steps", self.steps.value())
        s.setValue("form/width", self.width_.value())
        s.setValue("form/height", self.height_.value())
        s.setValue("form/advanced", self.advanced_button.isChecked())
        s.setValue("form/low_memory", self.low_memory.isChecked())
        s.setValue("form/negative", self.negative.text())
        s.setValue("form/loras", [f"{scale}|{ref}" for ref, scale in self.loras()])
        s.setValue("form/guidance", self.guidance.value())
        s.setValue("form/true_cfg", self.true_cfg.value())
        s.setValue("form/prompt", self.prompt.toPlainText())
        folders = [self.model.itemData(i) for i in range(self.model.count())
                   if self.model.itemData(i) not in dict(models.CHOICES) and self.model.itemData(i) != "__folder__"]
        s.setValue("form/folders", folders)

    def restore(self):
        s = self.settings

        def get(key, default, typ):
            v = s.value(key, default)
            try:
                return typ(v) if typ is not bool else (v if isinstance(v, bool) else str(v).lower() == "true")
            except (TypeError, ValueError):
                return default
        folders = s.value("form/folders", []) or []
        if isinstance(folders, str):
            folders = [folders]
        for f in folders:
            if Path(f).is_dir():
                i = self.model.count() - 1
                self.model.insertItem(i, models.label(f), f)
        model = s.value("form/model", models.DEMO)
        if model and (model in dict(models.CHOICES) or Path(str(model)).is_dir()):
            self.set_source(str(model))
        self.precision.setCurrentIndex(min(max(get("form/precision", 0, int), 0), self.precision.count() - 1))
        self.n.setValue(get("form/n", 4, int))
        self.diversity.setValue(get("form/diversity", DEFAULT_TICK, int))
        self.steps.setValue(get("form/steps", 0, int))
        self.width_.setValue(get("form/width", 0, int))
        self.height_.setValue(get("form/height", 0, int))
        self.advanced_button.setChecked(get("form/advanced", False, bool))
        self.low_memory.setChecked(get("form/low_memory", False, bool))
        self.negative.setText(str(s.value("form/negative", "") or ""))
        loras = s.value("form/loras", []) or []
        for entry in [loras] if isinstance(loras, str) else loras:
            scale, _, ref = str(entry).partition("|")
            try:
                self._add_lora(ref, float(scale))
            except ValueError:
                continue
        self.guidance.setValue(get("form/guidance", 0.0, float))
        self.true_cfg.setValue(get("form/true_cfg", 0.0, float))
        self.prompt.setPlainText(str(s.value("form/prompt", "") or ""))
        self.precision.setEnabled(self.source() != models.DEMO)
