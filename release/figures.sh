#!/usr/bin/env bash
# Regenerate the documentation's figures from the shipped model:
#   docs/attention.png  where the model looked for each word of the example cat's caption
#   docs/app.png        the web app in headless Chromium (the browser test's screenshot)
#   bash release/figures.sh
set -euo pipefail
cd "$(dirname "$0")/.."
captioner caption examples/cat.jpg --attention docs/attention.png
CAPTIONER_SCREENSHOT=docs/app.png python -m pytest -q -m browser tests/test_app_browser.py
