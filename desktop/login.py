"""Logging in to the Hugging Face Hub from the app. FLUX.1-dev and FLUX.2 [klein] 9B are gated: they
download only for an account that accepted their licence, with its access token saved where
huggingface_hub looks for it (the CLI's `hf auth login` does the same from a terminal, which an app user
may never open).
"""

from typing import Callable, Optional

from PySide6.QtCore import Qt
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
    it with `save`; a refused token or no network says so in the dialog and saves nothing."""

    def __init__(self, parent=None, verify: Optional[Callable] = None, save: Optional[Callable] = None):
        super().__init__(parent)
        self.setWindowTitle("Log in to Hugging Face")
        self.verify = verify or whoami
        self.save = save or save_token
        self.user = None  # the account's name once logged in
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
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(intro)
        lay.addWidget(self.token)
        lay.addWidget(self.error)
        lay.addWidget(buttons)
        self.setMinimumWidth(440)

    def submit(self) -> bool:
        """OK: check the token, save it and close; else say why and stay open."""
        token = self.token.text().strip()
        if not token:
            return self._say("Paste a token first.")
        try:
            info = self.verify(token)
            self.save(token)
        except Exception as e:  # noqa: BLE001 - whatever the Hub or the network says, the dialog says it plainly
            if hub.network_error(e):
                return self._say("Could not reach huggingface.co: check the internet connection and try again.")
            if isinstance(e, ValueError):  # huggingface_hub's own words, e.g. an organization's token
                return self._say(str(e))
            return self._say("huggingface.co did not accept this token: check that you copied all of it, "
                             "or create a new one.")
        self.user = (info or {}).get("name")
        self.accept()
        return True

    def _say(self, text: str) -> bool:
        self.error.setText(text)
        self.error.show()
        return False
