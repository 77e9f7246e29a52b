"""Loading a saved RetrievalMemory that was edited, truncated or replaced: every case is a ValueError naming the
file and the field, raised before anything is allocated, and nothing blocks (FIFOs, devices) or follows a symlink.

Manifest edits are tried twice: as they are (the manifest checksum refuses them) and re-checksummed (as a careless
tool or a malicious user would), so the field validation itself is what must refuse them.
"""
from __future__ import annotations

import json
import os
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from lrag_ext import memory_format
from lrag_ext.memory import KVLayout, MemoryConfig, RetrievalMemory

LAYOUT = KVLayout(num_layers=2, tokens_per_frame=3, num_heads=2, head_dim=8)


def saved_memory(path: str, dtype=torch.float32) -> RetrievalMemory:
    cfg = MemoryConfig(top_k=3, recent_exclude=2, sink_frames=1, window_frames=5, embed_dim=6, storage="kv",
                       kv_layout=LAYOUT, dtype=dtype, max_frames=64, page_size=4, device_frames=3, host_frames=None)
    mem = RetrievalMemory(cfg)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        s = mem.add_stream()
        for _ in range(5):
            L, T, H, Dh = LAYOUT.frame_shape
            mem.append(s, torch.randn(3, 6, generator=g), k=torch.randn(L, 3, T, H, Dh, generator=g),
                       v=torch.randn(L, 3, T, H, Dh, generator=g))
            mem.retrieve(s)
    mem.save(path)
    return mem


def rewrite(path: str, manifest: dict, checksum: bool) -> None:
    if checksum:
        manifest["manifest_sha256"] = memory_format.manifest_digest(manifest)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def first_stored(m):
    return next(f for f, c in enumerate(m["streams"]["0"]["kv_code"]) if c >= 0)


def set_code(m, frame, code):
    m["streams"]["0"]["kv_code"][frame] = code


# (name, edit of the manifest dict, text the error must contain besides the file name)
EDITS = [
    ("frames+1", lambda m: m["streams"]["0"].update(num_frames=m["streams"]["0"]["num_frames"] + 1), "streams['0']"),
    ("frames-huge", lambda m: m["streams"]["0"].update(num_frames=10 ** 15), "num_frames"),
    ("frames-str", lambda m: m["streams"]["0"].update(num_frames="15"), "num_frames"),
    ("page-minus-1", lambda m: m["streams"]["0"]["pages"].__setitem__(0, -1), "pages[0]"),
    ("page-beyond", lambda m: m["streams"]["0"]["pages"].__setitem__(0, 10 ** 6), "pages[0]"),
    ("page-shared", lambda m: m["streams"]["1"]["pages"].__setitem__(0, m["streams"]["0"]["pages"][0]), "pages"),
    ("page-bool", lambda m: m["streams"]["0"]["pages"].__setitem__(0, True), "pages[0]"),
    ("next-stream-low", lambda m: m.update(next_stream=1), "streams['1']"),
    ("next-stream-str", lambda m: m.update(next_stream="2"), "next_stream"),
    ("stream-id-neg", lambda m: m["streams"].update({"-1": m["streams"].pop("1")}), "streams['-1']"),
    ("stream-id-arabic-digit", lambda m: m["streams"].update({"\u0661": m["streams"]["1"]}), "streams['\u0661']"),
    ("stream-id-superscript", lambda m: m["streams"].update({"\u00b2": m["streams"].pop("1")}), "streams['\u00b2']"),
    ("stream-id-leading-zero", lambda m: m["streams"].update({"01": m["streams"].pop("1")}), "streams['01']"),
    ("first-retrievable-neg", lambda m: m["streams"]["0"].update(first_retrievable=-1), "first_retrievable"),
    ("first-retrievable-beyond", lambda m: m["streams"]["0"].update(first_retrievable=10 ** 6), "first_retrievable"),
    ("first-retrievable-above-stored", lambda m: m["streams"]["0"].update(first_retrievable=14), "kv_code"),
    ("code-segment", lambda m: set_code(m, first_stored(m), 99 << 32), "kv_code"),
    ("code-slot", lambda m: set_code(m, first_stored(m), 5000), "kv_code"),
    ("code-negative", lambda m: set_code(m, first_stored(m), -7), "kv_code"),
    ("code-shared", lambda m: set_code(m, first_stored(m) + 1, m["streams"]["0"]["kv_code"][first_stored(m)]),
     "already used"),
    ("code-sink", lambda m: set_code(m, 0, m["streams"]["0"]["kv_code"][first_stored(m)]), "kv_code[0]"),
    ("code-retrievable-missing", lambda m: (set_code(m, first_stored(m) + 1, -1),
                                            m["fifo"]["device"].remove([0, first_stored(m) + 1])
                                            if [0, first_stored(m) + 1] in m["fifo"]["device"]
                                            else m["fifo"]["host"].remove([0, first_stored(m) + 1])),
     "kv_code["),
    ("fifo-age-order", lambda m: m["fifo"]["host"].reverse(), "out of age order"),
    ("code-list-short", lambda m: m["streams"]["0"]["kv_code"].pop(), "kv_code"),
    ("device-segment", lambda m: m["segments"].__setitem__(0, 10 ** 9), "segments[0]"),
    ("host-segment-huge", lambda m: m["segments"].append(10 ** 9), "segments"),
    ("host-segment-size", lambda m: m["segments"].__setitem__(1, 17), "segments"),
    ("segments-str", lambda m: m.update(segments="3"), "segments"),
    ("fifo-missing", lambda m: m["fifo"]["device"].pop(), "fifo.device"),
    ("fifo-duplicate", lambda m: m["fifo"]["host"].append(m["fifo"]["host"][0]), "fifo.host"),
    ("fifo-wrong-tier", lambda m: m["fifo"]["device"].append(m["fifo"]["host"].pop()), "fifo"),
    ("fifo-item", lambda m: m["fifo"]["host"].__setitem__(0, "x"), "fifo.host[0]"),
    ("fifo-keys", lambda m: m["fifo"].pop("host"), "fifo"),
    ("stream-keys", lambda m: m["streams"]["0"].pop("log"), "streams['0']"),
    ("log-entry", lambda m: m["streams"]["0"]["log"].append(5), "log[5]"),
    ("log-timing-overflows-float", lambda m: m["streams"]["0"]["log"][-1]["timings_ms"].update(retrieve=10 ** 400),
     "timings_ms"),
    ("log-similarity-overflows-float",
     lambda m: m["streams"]["0"]["log"][-1]["selected_similarities"].__setitem__(0, -10 ** 400),
     "selected_similarities[0]"),
    ("config-dtype", lambda m: m["config"].update(dtype="int99"), "config"),
    ("config-dtype-type", lambda m: m["config"].update(dtype=5), "config"),
    ("config-device", lambda m: m["config"].update(device="bogus:x"), "config"),
    ("config-unknown-key", lambda m: m["config"].update(surprise=1), "config"),
    ("config-layout", lambda m: m["config"]["kv_layout"].pop("head_dim"), "config"),
    ("config-top-k", lambda m: m["config"].update(top_k=0), "config"),
    ("config-layout-none", lambda m: m["config"].update(kv_layout=None), "config is not a valid MemoryConfig: "
                                                                        "storage='kv' needs kv_layout"),
    ("config-memory-position", lambda m: m["config"].update(memory_position="sideways"),
     "config is not a valid MemoryConfig: memory_position must be"),
    ("config-memory-position-bool", lambda m: m["config"].update(memory_position=True), "memory_position"),
    ("config-memory-position-list", lambda m: m["config"].update(memory_position=[1]), "memory_position"),
    ("config-type", lambda m: m.update(config=[1, 2]), "config"),
    ("config-max-frames", lambda m: m["config"].update(max_frames=10 ** 12), "embedding_pages"),
    ("config-device-frames", lambda m: (m["config"].update(device_frames=10 ** 9),
                                        m["segments"].__setitem__(0, 10 ** 9)), "device_frames"),
    ("files-missing", lambda m: m.pop("files"), "files"),
    ("version-bool", lambda m: m.update(version=True), "unsupported format"),
]


@pytest.mark.parametrize("checksum", [True, False], ids=["rechecksummed", "as-edited"])
@pytest.mark.parametrize("name, edit, field", EDITS, ids=[e[0] for e in EDITS])
def test_edited_manifest_is_refused_naming_the_field(tmp_path, name, edit, field, checksum):
    path = str(tmp_path / "mem")
    saved_memory(path)
    manifest_file = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_file))
    edit(manifest)
    rewrite(path, manifest, checksum)
    with pytest.raises(ValueError) as err:
        RetrievalMemory.load(path)
    message = str(err.value)
    assert path in message
    if checksum or "unsupported format" in field:
        assert field in message, message
    else:
        assert "manifest_sha256" in message, message


@pytest.mark.parametrize("text, match", [
    ("", "the file is empty"),
    ("{", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ("null", "must be a JSON object"),
    ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ('{"format": "lrag_ext.RetrievalMemory", "version": 2}', "manifest_sha256"),
    ('{"format": "lrag_ext.RetrievalMemory", "version": 1}', "field config is missing"),
    ('{"format": "something else", "version": 2}', "unsupported format"),
])
def test_malformed_manifest_is_a_value_error(tmp_path, text, match):
    path = str(tmp_path / "mem")
    saved_memory(path)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        f.write(text)
    with pytest.raises(ValueError, match=match):
        RetrievalMemory.load(path)


def test_non_utf8_manifest(tmp_path):
    path = str(tmp_path / "mem")
    saved_memory(path)
    with open(os.path.join(path, "manifest.json"), "wb") as f:
        f.write(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="not valid JSON"):
        RetrievalMemory.load(path)


def load_in_thread(path: str, timeout: float = 20.0):
    """Runs load in a daemon thread: a load that blocks fails the test instead of hanging the suite."""
    result = {}

    def run():
        try:
            RetrievalMemory.load(path)
            result["error"] = None
        except BaseException as err:  # noqa: BLE001 - inspected below
            result["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"load({path!r}) blocked for {timeout} s"
    return result["error"]


@pytest.mark.parametrize("target", ["manifest.json", "tensors.safetensors"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero-symlink", "symlink-out", "folder"])
def test_special_files_are_refused_without_blocking(tmp_path, target, kind):
    path = str(tmp_path / "mem")
    saved_memory(path)
    file = os.path.join(path, target)
    outside = tmp_path / "outside"
    outside.write_bytes(open(file, "rb").read())
    os.remove(file)
    if kind == "fifo":
        os.mkfifo(file)
    elif kind == "dev-zero-symlink":
        os.symlink("/dev/zero", file)
    elif kind == "symlink-out":
        os.symlink(str(outside), file)
    else:
        os.mkdir(file)
    err = load_in_thread(path)
    assert isinstance(err, ValueError), repr(err)
    assert file in str(err) and ("symlink" in str(err) or "not a regular file" in str(err)), str(err)


def test_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        RetrievalMemory.load(str(tmp_path / "f"))


@pytest.mark.parametrize("change", ["extra", "dtype", "shape", "missing"])
def test_tensor_file_inconsistent_with_manifest(tmp_path, change):
    """A tensor file replaced consistently (sizes and checksums updated): its contents must still match."""
    path = str(tmp_path / "mem")
    saved_memory(path)
    tensor_file = os.path.join(path, "tensors.safetensors")
    tensors = load_file(tensor_file)
    if change == "extra":
        tensors["surprise"] = torch.zeros(1)
    elif change == "dtype":
        tensors["kv/0"] = tensors["kv/0"].double()
    elif change == "shape":
        tensors["kv/0"] = tensors["kv/0"][:-1].clone()
    else:
        del tensors["embedding_pages"]
    save_file(tensors, tensor_file)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    manifest["files"]["tensors.safetensors"] = dict(sha256=memory_format.sha256_file(tensor_file),
                                                    bytes=os.path.getsize(tensor_file))
    rewrite(path, manifest, checksum=True)
    with pytest.raises(ValueError, match=f"{tensor_file}: .*(holds tensors|tensor kv/0)"):
        RetrievalMemory.load(path)


def test_garbage_tensor_file_with_matching_checksum(tmp_path):
    path = str(tmp_path / "mem")
    saved_memory(path)
    tensor_file = os.path.join(path, "tensors.safetensors")
    with open(tensor_file, "wb") as f:
        f.write(b"\xff" * 64)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    manifest["files"]["tensors.safetensors"] = dict(sha256=memory_format.sha256_file(tensor_file), bytes=64)
    rewrite(path, manifest, checksum=True)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        RetrievalMemory.load(path)


def test_version_1_saves_still_load(tmp_path):
    """Saves of the previous format (no manifest checksum) load, fully validated, with identical results."""
    path = str(tmp_path / "mem")
    mem = saved_memory(path)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    del manifest["manifest_sha256"]
    manifest["version"] = 1
    rewrite(path, manifest, checksum=False)
    back = RetrievalMemory.load(path)
    for s in mem.streams():
        assert torch.equal(mem.retrieve(s).ids, back.retrieve(s).ids)
    manifest["streams"]["0"]["pages"][0] = -1
    rewrite(path, manifest, checksum=False)
    with pytest.raises(ValueError, match=r"pages\[0\]"):
        RetrievalMemory.load(path)
