"""What a run says about itself: its intent (intent.json) and its manifest (manifest.json).

`Intent` is what a run is, written first; `identity` is the part of it that decides whether an
existing run is the same one (resumed) or another (refused). `build_manifest` indexes every
tensor file of a finished run from the files' own headers: each tensor's digest (`blake3`, or
an older file's `sha256_tree` or `sha256`) and, where the model produced any, its NaN/Inf counts
(`nonfinite`). docs/FORMAT.md is the specification; the manifest's shape is checked on reading
by schema.check_manifest.
"""

from __future__ import annotations

import functools
import importlib.metadata as md
import json
import platform
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import filebits, tensorfile
from .errors import UserError
from .filebits import file_entries, item_text  # noqa: F401 (a file's entries: the format's, also made in the writer's process)
from .names import Layout, model_order_key

FORMAT = "layerwise-run"
FORMAT_VERSION = 3  # 3: tensors carry "blake3" digests (2: "sha256_tree", 1: plain "sha256"); all are read
MANIFEST = "manifest.json"
INTENT = "intent.json"
TENSOR_DIR = "tensors"


def library_versions() -> dict:
    """The versions of Python and the libraries that shape a run's numbers (recorded beside it)."""
    return dict(_versions())


@functools.lru_cache(maxsize=1)
def _versions() -> dict:
    """Looked up once a process: the packages a process imported do not change under it, and the
    lookup scans every entry of sys.path (2 ms, paid at the end of each extract)."""
    out = {"python": platform.python_version()}
    for package in ("layerwise", "torch", "transformers", "accelerate", "safetensors"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = None
    return out


@dataclass(frozen=True)
class Intent:
    """What a run is (intent.json, written first): its producer, model, settings and prompts, and
    for some producers the reference it replays, the model's layout ("anatomy"), the numerics
    fixes and library versions. Only model (less its path), settings and prompts decide whether
    an existing run is the same one (resumed) or another (refused)."""

    producer: str
    model: dict
    settings: dict
    prompts: list
    reference: dict | None = None
    anatomy: dict | None = None
    fixes: list | None = None
    versions: dict | None = None

    def as_dict(self) -> dict:
        """The JSON object, keys in the order the format shows them; absent parts left out."""
        keys = ("producer", "model", "settings", "reference", "anatomy", "prompts", "fixes", "versions")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def read_json(path: Path) -> dict:
    """A run's intent.json (an object), or one line saying it is corrupt."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        data = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8"
    if not isinstance(data, dict):
        why = data if isinstance(data, str) else f"a JSON {type(data).__name__}, not an object"
        raise UserError(f"{path} is not a run's intent ({why}): the run is corrupt; pass --overwrite to "
                        "replace it") from None
    return data


def identity(intent: dict) -> dict:
    """The parts of an intent that must match for a run to be resumed: the model (by its config,
    not by where its files happen to be), the settings and the prompts."""
    model = intent.get("model")
    model = {k: v for k, v in model.items() if k != "path"} if isinstance(model, dict) else model
    return {"model": model, "settings": intent.get("settings"), "prompts": intent.get("prompts")}


def first_difference(a: dict, b: dict) -> str:
    for key in a:
        if a[key] != b[key]:
            if isinstance(a[key], dict) and isinstance(b[key], dict):
                for sub in sorted(set(a[key]) | set(b[key])):
                    if a[key].get(sub) != b[key].get(sub):
                        return f"{key} {sub}"
            return key
    return "settings"


def index_files(path: Path, files: Iterable[str] | None = None) -> list[dict]:
    """Manifest entries (headers only) of a run's tensor files: `files` (paths relative to the
    run), else every one; the entry of a tensor that holds NaN/Inf carries "nonfinite": [nan, inf].
    Each digest keeps its algorithm's name as its field; a file without one gets "blake3": null."""
    entries = []
    for rel in sorted(tensor_files(path) if files is None else files):
        metadata: dict = {}
        entries += file_entries(rel, tensorfile.read_header(path / rel, metadata, _KEPT_FILE), metadata)
    return entries


_KEPT_FILE = ("run file", "delete it and rerun the same command to write it again")  # a resumed run's


def tensor_files(path: Path) -> list[str]:
    """A run's tensor files, relative to the run."""
    return [str(f.relative_to(path)) for f in (path / TENSOR_DIR).glob("p*/*.safetensors")
            if f.parent.name[1:].isdigit()]


def entry_digests(entry: dict) -> tuple[tuple[str, str], ...]:
    """The (algorithm, hex digest) pairs a manifest entry holds: ("blake3", "…") in a run of this
    version, ("sha256_tree", "…") or ("sha256", "…") in an older one; () when it holds none."""
    return tuple((a, entry[a]) for a in tensorfile.DIGESTS if entry.get(a))


_ONE_LINE = filebits.ONE_LINE  # no indent: json's C encoder


def json_text(document: dict, known: dict | None = None, between=None) -> str:
    """The text of a run's intent.json or manifest.json: a key a line at the top and in its
    dicts, a list's items (each tensor, each prompt) a line each, every value written by json's
    C encoder. An indented dump goes through json's pure-Python encoder: 3.7 ms for 640 tensors'
    entries on the 2-core VM, more for the prompts' token ids (a line per id), paid at the start
    and the end of every extract. `known` (filled as it goes): each list's text by its key, used
    again for the very same list object (the intent's prompts, in the manifest made from it:
    16 prompts of 4096 token ids are 4 ms on the VM); the caller vouches it was not changed since,
    or made the text itself (`list_text` of its items' `item_text`). `between()` runs after each
    list item is encoded (a background writer's time.sleep(0): the GIL handed back between items)."""
    parts = []
    for key, value in document.items():
        name = _ONE_LINE.encode({key: 0})[1:-2]  # `"key": `, the key as json writes keys
        if isinstance(value, list) and value:
            hit = known.get(key) if known is not None else None
            if hit is None or hit[0] is not value:
                items = map(_ONE_LINE.encode, value)
                hit = (value, list_text(items if between is None else _pausing(items, between)))
                if known is not None:
                    known[key] = hit
            parts.append(name + hit[1])
        elif isinstance(value, dict) and value:
            rows = (_ONE_LINE.encode({k: v})[1:-1] for k, v in value.items())
            parts.append(name + "{\n  " + ",\n  ".join(rows) + "\n }")
        else:
            parts.append(name + _ONE_LINE.encode(value))
    return "{\n " + ",\n ".join(parts) + "\n}\n" if parts else "{}\n"


def _pausing(texts, between):
    for text in texts:
        yield text
        between()


def list_text(items) -> str:
    """A list's text in `json_text`, from its items' texts (each `item_text`'s)."""
    return "[\n  " + ",\n  ".join(items) + "\n ]"


def build_manifest(path: Path, intent: dict, extra: dict, entries: list[dict] | None = None) -> dict:
    """The manifest of a run: `entries` (default: every tensor file indexed, headers only) in
    model order, and the tensors that hold NaN/Inf (`ManifestDraft`, all entries at once; the
    caller's entries are never changed)."""
    draft = ManifestDraft(intent)
    draft.add(index_files(path) if entries is None else entries)
    return draft.manifest(extra)


class ManifestDraft:
    """A manifest's tensors in model order, each with its text, made as a run's files come: an
    extract orders and encodes the entries of the files written during its forward pass while
    its last files are still being written, and `add`s only theirs once they are (a sort that
    merges two ordered runs). Each name's place in model order is worked out once, and an entry
    sorts by one integer, (prompt, place) folded together; an entry is copied only to take its
    NaN/Inf counts out (the caller's entries are never changed)."""

    def __init__(self, intent: dict):
        layout = Layout.of(intent.get("anatomy"))
        self._intent = intent
        self._where = (layout.layers_path, layout.embed, layout.norm, layout.head)
        self._place: dict[str, int] = {}  # name -> its place among the names added, in model order
        self._entries: list[dict] = []  # as the manifest holds them, in order once `add` returns
        self._texts: list[str | None] = []  # each entry's text, where it came with one
        self._nonfinite: list[dict] = []  # the "nonfinite" items

    def add(self, entries: Iterable[dict], texts: dict | None = None) -> None:
        """Entries (a file's, with "file" and "name"); `texts`: (file, name) -> an entry's text
        (`item_text`), made where the file was written; one missing is made by `encode`. Kept in
        lists, no object the garbage collector tracks made per entry (a tuple each: collections
        over every entry of a large run, several times the sort)."""
        kept, known = self._entries, len(self._entries)
        for e in entries:
            counts = e.get("nonfinite")
            if counts is not None:
                e = {k: v for k, v in e.items() if k != "nonfinite"}
                if counts:
                    self._nonfinite.append({"name": e["name"], "prompt": e["prompt"], "nan": counts[0], "inf": counts[1]})
            kept.append(e)
        self._texts += [texts.get((e["file"], e["name"])) for e in kept[known:]] if texts else [None] * (len(kept) - known)
        if len(kept) == known:
            return
        names = {e["name"] for e in kept[known:]}
        if not names <= self._place.keys():  # places of new names: the earlier entries keep their order
            where = self._where
            order = sorted(names | self._place.keys(), key=lambda n: model_order_key(n, *where))
            self._place = {n: i for i, n in enumerate(order)}
        place, width = self._place, len(self._place)
        keys = [e["prompt"] * width + place[e["name"]] for e in kept]  # one integer an entry, no call each
        perm = sorted(range(len(kept)), key=keys.__getitem__)  # the entries in order and the new ones: merged
        self._entries, self._texts = [kept[i] for i in perm], [self._texts[i] for i in perm]

    def _order(self):
        place, width = self._place, len(self._place)
        return lambda e: e["prompt"] * width + place[e["name"]]

    def manifest(self, extra: dict) -> dict:
        """The manifest: the intent, `extra`, the NaN/Inf list and the entries added, in model order."""
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **self._intent, **extra,
            "nonfinite": sorted(self._nonfinite, key=self._order()), "tensors": list(self._entries),
        }

    def encode(self) -> None:
        """Encode each entry that came without a text (`item_text`), once."""
        if None in self._texts:
            self._texts = [item_text(e) if t is None else t for e, t in zip(self._entries, self._texts)]

    def text(self) -> str:
        """The "tensors" list's text in `json_text` (`list_text` of each entry's)."""
        self.encode()
        return list_text(self._texts)
