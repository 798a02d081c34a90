"""What every self-contained HTML page of the project shares."""

ERROR_GUARD = r"""
const report = (message) => { document.getElementById("errors").textContent += message + "\n"; };
window.addEventListener("error", (e) => report(`${e.message} (${e.filename}:${e.lineno})`));
window.addEventListener("unhandledrejection", (e) => report(`unhandled rejection: ${e.reason}`));
"""
"""A page's first script (installed by a script of its own, before the main one, so that it also
reports the main script's syntax errors and anything thrown before its first line ran): every
error and unhandled rejection is written into the page's `<pre id="errors">`, which the tests read
from headless Chromium."""
