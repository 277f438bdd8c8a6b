"""Logging in to the Hugging Face Hub from the app. FLUX.1-dev and FLUX.2 [klein] 9B are gated: they
download only for an account that accepted their licence, with its access token saved where
huggingface_hub looks for it (the CLI's `hf auth login` does the same from a terminal, which an app user
may never open).
"""

import threading
from typing import Callable, Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QDialog, QDialogButtonBox, QLabel, QLineEdit, QVBoxLayout

from mlx_crepulse import hub

TOKENS_URL = "https://huggingface.co/settings/tokens"


def whoami(token: str) -> dict:
    """The account a token belongs to, as huggingface.co says (the network; raises when refused)."""
    from huggingface_hub import hf_api  # looked up at call time, as huggingface_hub's own login does
    return hf_api.whoami(token)


def save_token(token: str):
    """Save the token in huggingface_hub's own token store, where downloads find it."""
    from huggingface_hub import login
    login(token=token, add_to_git_credential=False)


class LoginDialog(QDialog):
    """"Log in to Hugging Face": paste a token, OK checks it with `verify` (default whoami) and saves
    it with `save`; a refused token or no network says so in the dialog and saves nothing. Both talk to
    huggingface.co, so they run on a thread of their own: a slow network never freezes the window."""

    checked = Signal(object, object)  # (the account's info, None) or (None, what went wrong)

    def __init__(self, parent=None, verify: Optional[Callable] = None, save: Optional[Callable] = None):
        super().__init__(parent)
        self.setWindowTitle("Log in to Hugging Face")
        self.verify = verify or whoami
        self.save = save or save_token
        self.user = None  # the account's name once logged in
        self.abandoned = False
        intro = QLabel("FLUX.1-dev and FLUX.2 [klein] 9B download only for a Hugging Face account that has "
                       "accepted their licence on their pages. Create an access token (\u201cRead\u201d is enough) "
                       f'at <a href="{TOKENS_URL}">huggingface.co/settings/tokens</a> and paste it here.')
        intro.setWordWrap(True)
        intro.setTextFormat(Qt.TextFormat.RichText)
        intro.setOpenExternalLinks(True)
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("hf_\u2026")
        self.error = QLabel()
        self.error.setWordWrap(True)
        self.error.setStyleSheet("color: #e06060;")
        self.error.hide()
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.submit)
        self.ok = buttons.button(QDialogButtonBox.StandardButton.Ok)
        self.checked.connect(self._answered)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(intro)
        lay.addWidget(self.token)
        lay.addWidget(self.error)
        lay.addWidget(buttons)
        self.setMinimumWidth(440)

    def submit(self):
        """OK: check the token and save it (on a thread); `_answered` closes the dialog or says why not."""
        token = self.token.text().strip()
        if not self.ok.isEnabled():  # a check is under way already
            return
        if not token:
            return self._say("Paste a token first.")
        self.ok.setEnabled(False)
        self._say("Checking the token with huggingface.co\u2026")
        self.check = threading.Thread(target=self._check, args=(token,), daemon=True)
        self.check.start()

    def reject(self):
        self.abandoned = True  # a check still under way saves nothing
        super().reject()

    def _check(self, token: str):
        try:
            info = self.verify(token)
            if self.abandoned:
                return
            self.save(token)
        except Exception as e:  # noqa: BLE001 - whatever the Hub or the network says, the dialog says it plainly
            info, error = None, e
        else:
            error = None
        try:
            self.checked.emit(info, error)
        except RuntimeError:  # the dialog was closed and deleted meanwhile: nobody is waiting
            pass

    def _answered(self, info, error):
        self.ok.setEnabled(True)
        if error is None:
            self.user = (info or {}).get("name")
            self.accept()
        elif hub.network_error(error):
            self._say("Could not reach huggingface.co: check the internet connection and try again.")
        elif isinstance(error, ValueError):  # huggingface_hub's own words, e.g. an organization's token
            self._say(str(error))
        else:
            self._say("huggingface.co did not accept this token: check that you copied all of it, "
                      "or create a new one.")

    def _say(self, text: str):
        self.error.setText(text)
        self.error.show()
