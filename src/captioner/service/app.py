"""Streamlit web app: upload a photo (or pick an example), see its caption, the alternatives
with their scores and where the model looked for each word; choose the model and beam size;
rate or correct the caption, stored in the same feedback store as the API's.

    captioner app [--config serve.toml] [--port 8501]

Uses only the `Captioner` facade (through the experiment's variants) and small helpers. Every
photo is opened by the project's one loader, under the server's limits, before anything is
shown (a file that is not a photo, or one too costly to decode, gets a friendly error; Streamlit
never decodes it). With API keys configured (the config's `api_keys` or CAPTIONER_API_KEYS) the
page asks for one in the sidebar and does nothing else until it is given, as the API would.
"""
from __future__ import annotations

import argparse
import hashlib
import html
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

PHOTO_TYPES = ["jpg", "jpeg", "png", "webp", "gif", "bmp"]


def launch(config: str | None, cfg, port: int = 8501) -> int:
    """Run this file under `streamlit run` on 127.0.0.1 until interrupted. The store is opened
    and the variants loaded first, as `captioner serve` does: one they refuse (a missing or corrupt
    checkpoint) is a one-line error here, not a traceback on the page."""
    from captioner.service.ab import load_variants
    from captioner.service.feedback import FeedbackStore

    FeedbackStore(cfg.db).close()
    load_variants(cfg.experiment, cfg.model_dir, cfg.image_limits())  # checked, then freed: the page loads its own
    cmd = [sys.executable, "-m", "streamlit", "run", str(Path(__file__).resolve()),
           "--server.address", cfg.host, "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal",
           "--server.maxUploadSize", str(max(1, cfg.max_body_bytes // 2**20)),
           "--", "--db", str(cfg.db)] + (["--config", str(config)] if config else [])
    proc = subprocess.Popen(cmd)
    previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())  # stopping us stops streamlit
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="captioner app")
    p.add_argument("--config", default=None)
    p.add_argument("--db", default=None)
    return p.parse_args(argv)


def open_photo(data: bytes, name: str, limits) -> tuple[object | None, str | None]:
    """(RGB PIL image, None), or (None, a message for the user) when the loader refuses it."""
    from captioner.data.images import load_image
    from captioner.errors import ImageError

    try:
        return load_image(data, limits, name=name), None
    except ImageError as e:
        return None, f"Cannot open {name}: {e.reason}. Upload a photo (JPEG, PNG, WebP, GIF or BMP)."


def main(argv: Sequence[str] | None = None) -> None:
    """The page; streamlit runs it top to bottom on every interaction."""
    import streamlit as st

    from captioner.service.ab import load_variants
    from captioner.service.config import load_serve_config
    from captioner.errors import CaptionerError
    from captioner.service.feedback import FeedbackError, FeedbackStore, Served, StoreUnavailable
    from captioner.data.images import example_photos, examples_dir
    from captioner.inference.plots import attention_overlay

    args = _parse(sys.argv[1:] if argv is None else argv)
    st.set_page_config(page_title="captioner", layout="wide")

    @st.cache_resource
    def resources(config: str | None, db: str | None):
        cfg = load_serve_config(config, db=db)
        return cfg, load_variants(cfg.experiment, cfg.model_dir, cfg.image_limits()), FeedbackStore(cfg.db)

    cfg, models, store = resources(args.config, args.db)
    st.title("captioner")
    with st.sidebar:
        keys = cfg.keys()
        if keys:  # the same keys as the API's: without one, nothing is captioned or stored
            from captioner.service.serve import key_matches

            given = st.text_input("API key", type="password", help="this app needs one of the server's API keys")
            if not (given and key_matches(given, keys)):
                st.warning("Enter a valid API key to use this app." if given else "Enter your API key to start.")
                return
        variant = st.selectbox("Model", list(models), help="the server's model variants")
        if cfg.max_beam_size > 1:  # a slider from 1 to 1 is an error in Streamlit
            beam_size = st.slider("Beam size", 1, cfg.max_beam_size, min(3, cfg.max_beam_size))
        else:
            beam_size = 1
        most_alt = min(beam_size, cfg.max_n_best) - 1
        if most_alt > 0:  # a slider from 0 to 0 is an error in Streamlit
            n_alt = st.slider("Alternatives", 0, most_alt, min(2, most_alt))
        else:
            n_alt = 0
            st.caption("No alternatives at beam size 1 (greedy search).")
        objects = st.toggle("Name objects", value=True,
                            help="put what the encoder's ImageNet classifier recognises into the caption")
        served = models[variant]
        st.caption(f"{served.captioner.name}, version {served.version}")

    left, right = st.columns([1, 2])
    with left:
        upload = st.file_uploader("Upload a photo", type=PHOTO_TYPES)
        examples = [p.name for p in example_photos()]
        example = st.selectbox("...or pick an example", ["(none)"] + examples, disabled=upload is not None)
        photo = upload.getvalue() if upload is not None else (
            (examples_dir() / example).read_bytes() if example != "(none)" else None)
        if photo is None:
            st.info("Upload a photo or pick an example to caption it.")
            return
        # the project's loader first, under the server's limits: Streamlit only shows what it decoded
        picture, problem = open_photo(photo, upload.name if upload is not None else example, cfg.image_limits())
        if picture is None:
            st.error(problem)
            return
        st.image(picture, width="stretch")

    key = (hashlib.sha256(photo).hexdigest(), variant, beam_size, n_alt, objects)
    if st.session_state.get("key") != key:
        try:
            with st.spinner("Captioning..."):
                cap = served.captioner.caption(picture, beam_size=beam_size, n_best=n_alt + 1, objects=objects)
        except CaptionerError as e:
            st.error(f"Cannot caption this photo: {e}")
            return
        try:
            cid = store.record_caption(Served("app", "web-app", cfg.experiment.name, variant, False,
                                              served.captioner.name, served.version, cap.text, cap.score,
                                              {"beam_size": beam_size, "n_best": n_alt + 1, "objects": objects},
                                              photo if cfg.store_images else None))
        except StoreUnavailable as e:
            st.error(f"Cannot store this caption right now: {e}")
            return
        st.session_state.update(key=key, caption=cap, caption_id=cid)
    cap, cid = st.session_state["caption"], st.session_state["caption_id"]

    with right:
        st.markdown(f'<p id="caption-text" style="font-size:1.8rem;font-weight:600">{html.escape(cap.text)}</p>',
                    unsafe_allow_html=True)
        st.caption(f"score {cap.score:.3f} (length-normalised log-probability) · caption id {cid}")
        if cap.objects:
            st.markdown("**Objects recognised:** " + ", ".join(
                f"{html.escape(o.name)} ({o.score:.2f})" for o in cap.objects))
        if cap.alternatives:
            st.table([{"alternative": t, "score": round(s, 3)} for t, s in cap.alternatives])
        st.subheader("Where it looked for each word")
        cols = st.columns(5)
        for i, (word, weights) in enumerate(zip(cap.words, cap.attention)):
            cols[i % 5].image(attention_overlay(picture, weights), caption=f"{word} ({weights.max():.2f})",
                              width="stretch")
        with st.form("feedback", clear_on_submit=False):
            st.subheader("Rate or correct this caption")
            rating = st.radio("Rating (1 = wrong, 5 = perfect)", [1, 2, 3, 4, 5], index=None, horizontal=True)
            correction = st.text_input("Corrected caption", placeholder="what the caption should have said")
            if st.form_submit_button("Send feedback"):
                try:
                    store.add_feedback(cid, rating=rating, correction=correction or None)
                    st.success("Thank you: feedback stored.")
                except (FeedbackError, StoreUnavailable) as e:
                    st.warning(str(e))


if __name__ == "__main__":
    main()
