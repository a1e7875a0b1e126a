"""Captioners: the official LLaVA prompt, image and decoding on a tiny model loaded by the real
loading code; batches; missing files; precision; ``ram``; the open_clip tagger; downloads."""

from __future__ import annotations

import importlib
import shutil
import socket
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffbir import weights
from diffbir.captioning import (
    CaptionerError,
    CaptionerUnavailableError,
    MissingCaptionerFilesError,
    build_captioner,
    join_prompt,
)
from diffbir.captioning.clip_tags import TEMPLATE, ClipTagger
from diffbir.captioning.llava import LLAVA, LlavaCaptioner, _quantization, llava_v1_prompt
from diffbir.pipeline.device import cpu_has_fast_half
from diffbir.tiny_weights import write_tiny_clip_tags, write_tiny_llava
from diffbir.weights import MissingWeightsError

# SPEC "Captioner", written out here rather than imported.
OFFICIAL_TEXT = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
    "Please give me a very short description of this image. ASSISTANT:"
)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKENS = 576  # (336 / 14) ** 2, CLS dropped
EOS = 2  # the tiny tokenizer's </s>


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "llava")


def _photo(real47_dir: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(real47_dir / name).convert("RGB"))


def _record_generate(captioner: LlavaCaptioner) -> list[tuple[dict, torch.Tensor]]:
    """Make ``captioner.model.generate`` record its keyword arguments and output."""
    calls = []
    generate = captioner.model.generate

    def recording(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs, out))
        return out

    captioner.model.generate = recording
    return calls


def _official_pixels(image: np.ndarray) -> np.ndarray:
    """SPEC's preprocessing, computed with PIL and numpy: a square of the mean colour with the
    image centred, bicubic to 336, /255, normalised; (3, 336, 336)."""
    h, w = image.shape[:2]
    side = max(h, w)
    square = Image.new("RGB", (side, side), tuple(int(x * 255) for x in CLIP_MEAN))
    square.paste(Image.fromarray(image), ((side - w) // 2, (side - h) // 2))
    x = np.asarray(square.resize((336, 336), Image.BICUBIC), dtype=np.float64) / 255
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def test_llava_prompt_is_the_official_text() -> None:
    assert llava_v1_prompt() == OFFICIAL_TEXT


def test_llava_model_receives_official_prompt_and_image(llava_dir: Path, real47_dir: Path) -> None:
    photo = _photo(real47_dir, "1.jpg")
    assert photo.shape[:2] == (182, 276)  # wide: padded above and below
    captioner = LlavaCaptioner(llava_dir, max_new_tokens=16)
    calls = _record_generate(captioner)
    (caption,) = captioner.caption([photo])
    ((kwargs, out),) = calls
    tok = captioner.tokenizer
    image_id = captioner.model.config.image_token_id

    # Token ids: as the official tokenizer_image_token, each part apart, the second's BOS
    # dropped, 576 image tokens between.
    received = kwargs["input_ids"][0].tolist()
    before, after = OFFICIAL_TEXT.split("<image>")
    start = received.index(image_id)
    assert received == (
        tok(before).input_ids + [image_id] * IMAGE_TOKENS + tok(after).input_ids[1:]
    )
    assert received[0] == tok.bos_token_id
    around = tok.convert_ids_to_tokens(received[start - 3 : start + IMAGE_TOKENS + 3])
    assert around[:3] == ["▁USER", ":", "▁"]
    assert around[3:-3] == ["<image>"] * IMAGE_TOKENS
    assert around[-3:] == ["▁", "<0x0A>", "Pl"]  # the "▁" that whole-text tokenization loses
    whole = tok(OFFICIAL_TEXT).input_ids
    assert whole[whole.index(image_id) + 1] != received[start + IMAGE_TOKENS]
    # As text: each side of the image tokens decodes to the official text.
    assert tok.decode(received[:start], skip_special_tokens=True) == before
    assert tok.decode(received[start + IMAGE_TOKENS :]) == after
    assert kwargs["attention_mask"].tolist() == [[1] * len(received)]

    # Image: SPEC's preprocessing of the non-square photo.
    pixels = kwargs["pixel_values"]
    assert pixels.shape == (1, 3, 336, 336) and pixels.dtype == torch.float32
    np.testing.assert_allclose(pixels[0].numpy(), _official_pixels(photo), rtol=0, atol=2e-6)

    # Caption: only the new tokens, up to end-of-sequence, special tokens skipped, stripped.
    new = out[0, len(received) :].tolist()
    end = new.index(EOS) + 1 if EOS in new else len(new)
    assert caption and caption == tok.decode(new[:end], skip_special_tokens=True).strip()
    assert join_prompt(caption, "best quality") == f"{caption}, best quality"


def test_llava_caption_is_the_new_tokens_decoded_and_stripped(llava_dir: Path) -> None:
    captioner = LlavaCaptioner(llava_dir)
    tok = captioner.tokenizer
    space = tok.convert_tokens_to_ids("▁")
    words = tok("a red sofa", add_special_tokens=False).input_ids
    pad, image = tok.pad_token_id, captioner.model.config.image_token_id
    generated = [
        [space, *words, image, space, EOS, *words],  # a special token inside, words after EOS
        [space, space, *words, *[pad] * (len(words) + 1), space],  # no EOS: pads skipped
    ]

    def fake_generate(input_ids, **kwargs):
        return torch.cat([input_ids, torch.tensor(generated)], dim=1)

    captioner.model.generate = fake_generate
    captioner.batch_size = 2
    photo = np.zeros((20, 30, 3), np.uint8)
    assert captioner.caption([photo, photo]) == ["a red sofa", "a red sofa"]


def test_llava_decoding_is_greedy(llava_dir: Path, real47_dir: Path) -> None:
    assert LlavaCaptioner(llava_dir).generation_config.max_new_tokens == 512
    steps = 6
    captioner = LlavaCaptioner(llava_dir, max_new_tokens=steps)
    calls = _record_generate(captioner)
    captioner.caption([_photo(real47_dir, "27.jpg")])
    ((kwargs, out),) = calls
    config = kwargs["generation_config"]
    assert (config.do_sample, config.num_beams, config.max_new_tokens) == (False, 1, steps)
    ids = kwargs["input_ids"]
    with torch.no_grad():  # argmax of full forward passes, no cache
        for _ in range(steps):
            logits = captioner.model(input_ids=ids, pixel_values=kwargs["pixel_values"]).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert out.tolist() == ids.tolist()


def test_llava_batched_equals_one_at_a_time(llava_dir: Path, real47_dir: Path) -> None:
    # 32.jpg ends (end-of-sequence) after 17 tokens on the tiny model; the others run to the
    # limit: one batch mixes finished and unfinished rows, and every size differs.
    names = ["32.jpg", "1.jpg", "27.jpg", "5.jpg", "55.jpg"]
    photos = [_photo(real47_dir, n) for n in names]
    assert len({p.shape for p in photos}) == len(photos)
    single = LlavaCaptioner(llava_dir, max_new_tokens=24)
    calls = _record_generate(single)
    one_by_one = [single.caption([p])[0] for p in photos]
    lengths = [out.shape[1] - kw["input_ids"].shape[1] for kw, out in calls]
    assert min(lengths) < 24 == max(lengths)
    assert len(set(one_by_one)) == len(photos)
    batched = LlavaCaptioner(llava_dir, max_new_tokens=24, batch_size=3)
    calls = _record_generate(batched)
    assert batched.caption(photos) == one_by_one
    assert [kw["input_ids"].shape[0] for kw, _ in calls] == [3, 2]


def test_join_prompt_drops_empty_parts() -> None:
    assert join_prompt("a cat", "") == "a cat"
    assert join_prompt("", "high quality") == "high quality"
    assert join_prompt("", "") == ""
    assert join_prompt("a cat", "high quality") == "a cat, high quality"


def test_llava_loads_from_hub_cache_without_network(
    llava_dir: Path, real47_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    repo = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf"
    shutil.copytree(llava_dir, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")

    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading a captioner")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    photo = _photo(real47_dir, "16.jpg")
    with build_captioner("llava", cache_dir=tmp_path / "hub") as hub:
        hub.generation_config.max_new_tokens = 8
        from_cache = hub.caption([photo])
    local = LlavaCaptioner(llava_dir, max_new_tokens=8)
    assert from_cache == local.caption([photo])


def test_llava_missing_files_name_file_place_and_command(llava_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingCaptionerFilesError) as err:
        build_captioner("llava", cache_dir=tmp_path / "empty")
    message = str(err.value)
    assert isinstance(err.value, MissingWeightsError)
    assert LLAVA.repo_id in message and str(tmp_path / "empty") in message
    assert "diffbir-download --captioner llava" in message

    partial = tmp_path / "partial"
    shutil.copytree(llava_dir, partial)
    (partial / "model.safetensors").unlink()
    (partial / "preprocessor_config.json").unlink()
    with pytest.raises(MissingCaptionerFilesError) as err:
        build_captioner("llava", model=partial)
    message = str(err.value)
    assert "2 model file(s) missing" in message and str(partial.resolve()) in message
    assert "preprocessor_config.json" in message and "model.safetensors" in message

    (partial / "preprocessor_config.json").write_text("{}")
    index = '{"weight_map": {"a": "model-00001-of-00002.safetensors"}}'
    (partial / "model.safetensors.index.json").write_text(index)
    with pytest.raises(MissingCaptionerFilesError, match="model-00001-of-00002.safetensors"):
        build_captioner("llava", model=partial)
    with pytest.raises(CaptionerError, match="expected a folder or a Hub repository id"):
        build_captioner("llava", model=tmp_path / "no" / "such" / "folder")


def test_llava_precision_choices(llava_dir: Path, real47_dir: Path) -> None:
    for bits in ("4bit", "8bit"):
        with pytest.raises(CaptionerError, match=f"--captioner-precision {bits}: .*CUDA"):
            build_captioner("llava", model=llava_dir, precision=bits, device="cpu")
    with pytest.raises(CaptionerError, match="--captioner-precision: expected one of 4bit"):
        build_captioner("llava", model=llava_dir, precision="fp64")
    # What CUDA would load (not runnable here): the official builder's 4-bit settings.
    nf4 = _quantization(4)
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4"
    assert nf4.bnb_4bit_use_double_quant and nf4.bnb_4bit_compute_dtype == torch.float16
    assert nf4.llm_int8_skip_modules == ["vision_tower", "lm_head"]
    assert _quantization(8).load_in_8bit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        half = LlavaCaptioner(llava_dir, precision="fp16")
    slow = [w for w in caught if "no native fp16 support" in str(w.message)]
    assert len(slow) == (not cpu_has_fast_half(torch.float16))
    photo = _photo(real47_dir, "1.jpg")
    pixels = half.pixel_values([photo])
    assert pixels.dtype == torch.float16  # as the official cast
    assert torch.equal(pixels, LlavaCaptioner(llava_dir).pixel_values([photo]).half())
    assert half.model.dtype == torch.float16


def test_ram_is_refused_and_names_clip_tags() -> None:
    with pytest.raises(CaptionerUnavailableError, match="not provided") as err:
        build_captioner("ram")
    assert "clip-tags" in str(err.value) and "PyPI" in str(err.value)
    with pytest.raises(CaptionerError, match="captioner: expected one of none, llava"):
        build_captioner("blip")


def test_missing_package_names_the_extra(llava_dir: Path, monkeypatch) -> None:
    real_import = importlib.import_module

    def without_transformers(name, *args):
        if name == "transformers":
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_transformers)
    with pytest.raises(CaptionerUnavailableError, match=r"pip install 'diffbir\[caption\]'"):
        build_captioner("llava", model=llava_dir)


def test_captioner_inputs_and_streaming(real47_dir: Path) -> None:
    captioner = build_captioner("none", batch_size=2)
    photo = _photo(real47_dir, "1.jpg")
    assert captioner.caption([photo, photo.astype(np.float32) / 255]) == ["", ""]
    for bad, reason in [
        (photo[..., 0], "expected an H x W x 3 RGB array"),
        (photo.astype(np.int16), "expected uint8 or float"),
        (photo.astype(np.float32), r"expected float values in \[0, 1\]"),
    ]:
        with pytest.raises(CaptionerError, match=f"image 1: {reason}"):
            captioner.caption([photo, bad])
    with pytest.raises(CaptionerError, match="--captioner-batch-size"):
        build_captioner("none", batch_size=0)

    read = []

    def images():
        for i in range(5):
            read.append(i)
            yield photo

    stream = captioner.caption_stream(images(), total=5, progress=True)
    next(stream)
    assert read == [0, 1]  # a caption comes out after its batch, before the rest is read
    assert len(list(stream)) == 4


def test_close_frees_the_model(llava_dir: Path, real47_dir: Path) -> None:
    with LlavaCaptioner(llava_dir, max_new_tokens=2) as captioner:
        model = weakref.ref(captioner.model)
        captioner.caption([_photo(real47_dir, "1.jpg")])
    assert model() is None
    with pytest.raises(RuntimeError, match="used after close"):
        captioner.caption([_photo(real47_dir, "1.jpg")])


def test_clip_tags_are_top_vocabulary_entries(tmp_path: Path, real47_dir: Path) -> None:
    folder = write_tiny_clip_tags(tmp_path / "clip")
    vocabulary = ("cat", "dog", "tree", "car", "sky")
    tagger = ClipTagger(folder, vocabulary=vocabulary, max_tags=2, min_probability=0.0)
    photos = [_photo(real47_dir, n) for n in ("1.jpg", "27.jpg", "5.jpg")]
    tags = tagger.caption(photos)

    # Independent zero-shot scores: template, unit features, logit scale, softmax.
    import open_clip

    model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        text = model.encode_text(tokenizer([TEMPLATE.format(v) for v in vocabulary]))
        for photo, got in zip(photos, tags, strict=True):
            image = model.encode_image(preprocess(Image.fromarray(photo))[None])
            sims = torch.cosine_similarity(image, text) * model.logit_scale.exp()
            order = sims.softmax(-1).argsort(descending=True)[:2].tolist()
            assert got == ", ".join(vocabulary[i] for i in order)

    tagger.batch_size = 2
    assert tagger.caption(photos) == tags
    tagger.min_probability = 1.0
    assert tagger.caption(photos[:1]) == [""]
    with pytest.raises(CaptionerError, match="clip-tags runs in fp32"):
        build_captioner("clip-tags", model=folder, precision="fp16")


def test_download_cli_fetches_captioner_into_hub_cache(tmp_path: Path, monkeypatch, capsys) -> None:
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, *, cache_dir, allow_patterns):
        calls.append((repo_id, allow_patterns))
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        for name in ("config.json", "preprocessor_config.json", "tokenizer_config.json"):
            (folder / name).write_text("{}")
        (folder / "tokenizer.model").write_bytes(b"")
        (folder / "model.safetensors").write_bytes(b"")
        return str(folder)

    def no_diffbir_files(*args, **kwargs):
        raise AssertionError("DiffBIR weights fetched with --captioner alone")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(weights, "download", no_diffbir_files)
    assert weights.main(["--captioner", "llava", "--quiet"]) == 0
    assert calls == [(LLAVA.repo_id, ["*.json", "*.safetensors", "tokenizer.model"])]
    assert f"ok      captioner llava: {tmp_path / 'snapshot'}" in capsys.readouterr().out

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert weights.main(["--captioner", "llava", "--quiet"]) == 1
    assert "failed  captioner llava" in capsys.readouterr().err
