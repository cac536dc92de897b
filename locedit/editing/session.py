"""`EditSession`: many edits to one model, in batches, with a log, checkpoints, resume and a bit-exact revert.

The model always holds one cumulative edit: W = W₀ + C for every parameter the session touched (C in float32).
A batch is edited with `locedit.edit` on top of it and then folded into C, so AlphaEdit sees the keys of every
earlier edit (kept with C) and a resumed run computes exactly what an uninterrupted one would. In `out`:
- `session.json`: the run's settings and a fingerprint of its requests (a resume must match them);
- `log.jsonl`: one row per request, in order (a `RunStore` keyed by the request's position): edited or skipped
  and why, its batch, method and timings;
- `checkpoint.safetensors`: C for every touched parameter, the accumulated keys, the log position and the
  fingerprints of the original tensors; written atomically every `checkpoint_every` requests and when the run
  stops. A resume applies it to the unedited model and continues after its position; log rows written after it
  (a hard kill) are dropped and those requests redone, so no edit is lost or applied twice."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from locedit.core.facts import EditRequest
from locedit.core.results import write_atomic
from locedit.core.store import RunStore
from locedit.editing.api import check_request, edit, located_sites
from locedit.editing.edit import Edit, WeightDelta, applied_edits, geometry, tensor_sha256, unedited
from locedit.editing.hparams import read_hparams
from locedit.errors import CheckpointError, EditError, FactError

FORMAT = "locedit-session"
VERSION = 1
SETTINGS_NAME = "session.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_NAME = "checkpoint.safetensors"
SESSION_METHODS = ("memit", "locft", "rome", "ft")
JOINT_METHODS = ("memit", "locft")  # one update per batch of requests
# AlphaEdit's 2,000 edits ran in batches of 100; LocFT-BF: a chunk of 100 requests trained breadth-first
DEFAULT_BATCH = {"memit": 100, "locft": 100, "rome": 1, "ft": 1}


@dataclass
class SessionReport:
    """What one `EditSession.run` call did: requests done in this call and in all, edited and skipped, and whether
    it stopped early on SIGINT (the checkpoint then holds everything logged)."""

    total: int
    position: int
    edited: int
    skipped: int
    resumed_from: int
    redone: int
    interrupted: bool
    seconds: float
    layers: list[int] = field(default_factory=list)

    def summary(self) -> str:
        state = "interrupted" if self.interrupted else ("done" if self.position == self.total else "stopped")
        resumed = f", resumed at {self.resumed_from}" if self.resumed_from else ""
        redone = f", {self.redone} redone after the last checkpoint" if self.redone else ""
        return (f"session {state}: {self.position}/{self.total} requests ({self.edited} edited, {self.skipped} "
                f"skipped{resumed}{redone}) at layer(s) {self.layers}, {self.seconds:.1f} s")


def compact_keys(keys: torch.Tensor) -> torch.Tensor:
    """`keys` (d_k × n) as at most d_k columns with the same K Kᵀ (all AlphaEdit reads of earlier edits) once n
    exceeds 2·d_k, so thousands of edits keep a bounded key history; unchanged below that."""
    d_k, n = keys.shape
    if n <= 2 * d_k:
        return keys
    gram = keys.double() @ keys.double().T
    values, vectors = torch.linalg.eigh(gram)
    return (vectors * values.clamp_min(0).sqrt()).float()


class EditSession:
    """Apply many `EditRequest`s to `lm` in batches (`method` "memit", with `hparams={"nullspace": True}` for
    AlphaEdit, batch `batch_size`; "rome" and "ft" one by one), logging each to `out` and checkpointing every
    `checkpoint_every` requests. `run(requests)` starts or resumes; `revert()` restores the original bytes of every
    touched tensor. `layers=None` / `key_position=None`: as `locedit.edit` chooses for the first request (one
    `locate`; the model's measured edit layer where it has one), then fixed for the whole session. The model must
    carry no other edit."""

    def __init__(self, lm, out: str | os.PathLike, *, method: str = "memit", hparams: dict | None = None,
                 layers: Sequence[int] | None = None, key_position: str | None = None,
                 batch_size: int | None = None, checkpoint_every: int = 100, corpus=None,
                 progress: bool = False) -> None:
        if method not in SESSION_METHODS:
            raise EditError(f"an editing session uses one of {', '.join(SESSION_METHODS)}, not {method!r}")
        batch_size = DEFAULT_BATCH[method] if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise EditError(f"batch_size must be a positive integer, not {batch_size!r}")
        if method not in JOINT_METHODS and batch_size != 1:
            raise EditError(f"method {method!r} edits one fact at a time; batch_size must be 1, not {batch_size}")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise EditError(f"checkpoint_every must be a positive integer, not {checkpoint_every!r}")
        self.lm = lm
        self.out = Path(out)
        self.method = method
        self.hparams = dict(hparams) if hparams else None
        self.params = read_hparams(method, self.hparams, warn=False).params  # checked now, before any work
        self.layers = sorted(int(l) for l in layers) if layers is not None else None
        self.key_position = key_position
        self.batch_size = batch_size
        self.checkpoint_every = checkpoint_every
        self.corpus = corpus
        self.progress = progress
        self.log = RunStore(self.out / LOG_NAME, key="id")
        self.position = 0
        self._change: dict[str, torch.Tensor] = {}  # parameter -> W - W₀ (float32, on the CPU)
        self._originals: dict[str, str] = {}  # parameter -> sha256 of W₀
        self._keys: dict[int, torch.Tensor] = {}  # layer -> (d_k, n) keys of every MEMIT edit applied
        self._facts: list = []
        self._targets: list[str] = []
        self._cumulative: Edit | None = None
        self._stats = None
        self._stop = False
        self._committing = False
        self._checkpointed = 0
        self._requests_sha256: str | None = None

    def __repr__(self) -> str:
        return f"EditSession({self.method}, {str(self.out)!r}, position={self.position})"

    # --- running ------------------------------------------------------------------------------------------
    def run(self, requests: Sequence[EditRequest], *, limit: int | None = None) -> SessionReport:
        """Edit `requests` in order, resuming after what `out` already holds (the same requests and settings).
        `limit`: stop after this many requests in all. SIGINT finishes the batch in flight, checkpoints and
        returns (`interrupted`); a second SIGINT rolls the batch back instead."""
        start = time.perf_counter()
        requests = list(requests)
        for i, r in enumerate(requests):
            if not isinstance(r, EditRequest):
                raise EditError(f"request {i} is a {type(r).__name__}, not an EditRequest")
        resumed, redone = self._open(requests)
        self._stop = False
        end = len(requests) if limit is None else min(len(requests), int(limit))
        edited = skipped = 0
        if self.layers is None and self.position < end:
            self._locate_once(requests[self.position:end])
        previous = self._install_handler()
        try:
            while self.position < end and not self._stop:
                batch = requests[self.position:min(end, self.position + self.batch_size)]
                rows = self._edit_batch(batch, self.position)
                edited += sum(r["status"] == "edited" for r in rows)
                skipped += sum(r["status"] == "skipped" for r in rows)
                if self.position - self._checkpointed >= self.checkpoint_every:
                    self._write_checkpoint()
        except BaseException:
            self._roll_back_in_flight()
            if self.position > self._checkpointed:
                self._write_checkpoint()
            raise
        finally:
            self._restore_handler(previous)
        if self.position > self._checkpointed or not (self.out / CHECKPOINT_NAME).exists():
            self._write_checkpoint()
        return SessionReport(total=len(requests), position=self.position, edited=edited, skipped=skipped,
                             resumed_from=resumed, redone=redone, interrupted=self._stop and self.position < end,
                             seconds=time.perf_counter() - start, layers=list(self.layers or []))

    def _locate_once(self, requests: list[EditRequest]) -> None:
        """Fix the session's layers (and key position, unless given) from the first request `locate` can read."""
        if self.method == "locft":
            from locedit.editing.locft import locft_layer

            layer, source = locft_layer(self.lm)
            self.layers, self.key_position = [layer], self.key_position or "subject_last"
            if self.progress:
                print(f"session: LocFT-BF tunes layer {layer} ({source}; fixed for the session)", file=sys.stderr)
            return
        problem = None
        for request in requests:
            try:
                layers, rule = located_sites(self.lm, request.fact, self.method)
            except FactError as e:
                problem = e
                continue
            self.layers = layers
            self.key_position = self.key_position or rule
            if self.progress:
                print(f"session: layers {layers}, key position {self.key_position} (located for "
                      f"{request.fact.subject!r}; fixed for the session)", file=sys.stderr)
            return
        raise EditError(f"no request could be located to choose the session's layers ({problem}); give layers=")

    def revert(self) -> None:
        """Restore the original bytes of every tensor the session changed (bit-exact); the session is then empty
        on the model (its files stay: a new `EditSession` on them resumes)."""
        if self._cumulative is not None and self._cumulative.is_applied:
            self._cumulative.revert()
        self._cumulative = None

    @property
    def edit(self) -> Edit | None:
        """The cumulative edit applied to the model (None before the first edit)."""
        return self._cumulative

    # --- one batch ----------------------------------------------------------------------------------------
    def _edit_batch(self, batch: list[EditRequest], first: int) -> list[dict]:
        t0 = time.perf_counter()
        rows: list[dict] = []
        todo: list[tuple[int, EditRequest]] = []
        for i, request in enumerate(batch, start=first):
            try:
                if self.method != "locft":  # fine-tuning needs no top-1 (EditRequest refused new == old)
                    check_request(self.lm, request)
                todo.append((i, request))
            except FactError as e:
                rows.append(self._row(i, request, first, "skipped", str(e)))
        new_edit, problem, timings = None, None, {}
        if todo:
            try:
                new_edit = edit(self.lm, [r for _, r in todo] if self.method in JOINT_METHODS else todo[0][1],
                                method=self.method, layers=self.layers, key_position=self.key_position,
                                hparams=self.hparams, stats=self._stats, corpus=self.corpus)
                timings = dict(new_edit.timings)
            except (FactError, EditError) as e:
                problem = str(e)
        self._committing = True  # from here the batch is finished, not rolled back
        try:
            if new_edit is not None:
                self._fold(new_edit)
            for i, request in todo:
                rows.append(self._row(i, request, first, "skipped" if problem else "edited", problem, timings))
            rows.sort(key=lambda r: r["position"])
            seconds = time.perf_counter() - t0
            for row in rows:
                row["batch_s"] = seconds
            self.log.append(rows)
            self.position = first + len(batch)
        finally:
            self._committing = False
        if self.progress:
            print(f"session: {self.position} requests ({len(todo) if not problem else 0} edited in this batch, "
                  f"{time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        return rows

    def _row(self, index: int, request: EditRequest, first: int, status: str, reason: str | None,
             timings: dict | None = None) -> dict:
        fact = request.fact
        return {"id": str(index), "position": index, "batch": first // self.batch_size if self.batch_size else 0,
                "batch_start": first, "method": self.method, "status": status, "reason": reason,
                "fact_id": fact.meta.get("id"), "subject": fact.subject, "prompt": fact.prompt,
                "target": fact.target, "new_target": request.new_target,
                "timings": {k: float(v) for k, v in (timings or {}).items()}}

    def _fold(self, new_edit: Edit) -> None:
        """Fold the applied `new_edit` into the cumulative change and apply that instead (one edit on the model)."""
        if self.layers is None:
            self.layers = list(new_edit.layers)
        if self.key_position is None:
            self.key_position = new_edit.sites.get("key_position")
        changes = {d.name: d.matrix().detach().float().cpu() for d in new_edit.deltas}
        change, keys, originals = dict(self._change), dict(self._keys), dict(self._originals)
        for name, delta in changes.items():
            change[name] = change[name] + delta if name in change else delta
        for layer, k in new_edit.keys.items():
            k = k.detach().float().cpu()
            keys[layer] = compact_keys(torch.cat([keys[layer], k], dim=1) if layer in keys else k)
        new_edit.revert()
        old = self._cumulative
        if old is not None:
            old.revert()
        params = dict(self.lm.model.named_parameters())
        for name in changes:
            originals.setdefault(name, tensor_sha256(params[name]))
        state = (self._change, self._keys, self._originals, self._facts, self._targets)
        self._change, self._keys, self._originals = change, keys, originals
        self._facts, self._targets = self._facts + list(new_edit.facts), self._targets + list(new_edit.new_targets)
        try:
            self._apply_cumulative()
        except BaseException:  # the model and the session stay as before this batch
            self._change, self._keys, self._originals, self._facts, self._targets = state
            self._cumulative = old
            if old is not None:
                old.apply(self.lm)
            raise
        if self._stats is None and self._needs_stats():
            from locedit.editing.stats import key_statistics

            with unedited(self.lm):
                self._stats = key_statistics(self.lm, layers=self.layers, kinds=("mlp",), corpus=self.corpus,
                                             tokens=self.params.stats_tokens, progress=False)

    def _needs_stats(self) -> bool:
        return self.method == "memit" or (self.method == "rome" and bool(getattr(self.params, "mom2_adjustment",
                                                                                  False)))

    def _apply_cumulative(self) -> None:
        deltas = [WeightDelta(name=name, original_sha256=self._originals[name], shape=tuple(change.shape),
                              dense=change) for name, change in self._change.items()]
        cumulative = Edit(method=f"session-{self.method}", facts=list(self._facts), new_targets=list(self._targets),
                          sites={"layers": list(self.layers or []), "key_position": self.key_position},
                          hparams=dict(self.hparams or {}), deltas=deltas,
                          model={"name": self.lm.name, "geometry": geometry(self.lm),
                                 "tensors": dict(self._originals)},
                          keys=dict(self._keys), notes=[f"editing session {self.out}"])
        self._cumulative = cumulative.apply(self.lm)

    def _roll_back_in_flight(self) -> None:
        """Revert any edit applied on top of the cumulative one (a batch interrupted before it was folded)."""
        for other in reversed(applied_edits(self.lm)):
            if other is not self._cumulative:
                other.revert()
        if self._cumulative is not None and not self._cumulative.is_applied:
            self._apply_cumulative()

    # --- SIGINT -------------------------------------------------------------------------------------------
    def _install_handler(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_handler(self, previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum, frame) -> None:
        if self._stop and not self._committing:
            raise KeyboardInterrupt  # second Ctrl-C: roll the batch in flight back
        self._stop = True
        print("session: interrupted; finishing the batch in flight and writing a checkpoint (Ctrl-C again to roll "
              "the batch back)", file=sys.stderr)

    # --- files --------------------------------------------------------------------------------------------
    def _settings(self, requests: list[EditRequest]) -> dict:
        digest = hashlib.sha256()
        for r in requests:
            digest.update(json.dumps([r.fact.subject, r.fact.prompt, r.fact.target, r.new_target]).encode())
        return {"format": FORMAT, "version": VERSION, "method": self.method, "hparams": self.hparams,
                "layers": self.layers, "key_position": self.key_position, "batch_size": self.batch_size,
                "requests": len(requests), "requests_sha256": digest.hexdigest(), "model": self.lm.name,
                "geometry": geometry(self.lm)}

    def _open(self, requests: list[EditRequest]) -> tuple[int, int]:
        """Start a new run in `out`, or resume the one there; returns (position resumed at, requests redone)."""
        settings = self._settings(requests)
        if self._cumulative is not None:
            if not self._cumulative.is_applied:
                raise EditError("this session was reverted; start a new EditSession on its directory to resume")
            if settings["requests_sha256"] != self._requests_sha256:
                raise CheckpointError("this session edits other requests; continue it with the same ones")
            return self.position, 0  # the same session object, continued
        if applied_edits(self.lm):
            raise EditError("the model already carries locedit edits; an editing session starts from the unedited "
                            "model (revert them first)")
        self._requests_sha256 = settings["requests_sha256"]
        path = self.out / SETTINGS_NAME
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path} is unreadable ({e}); remove {self.out} to start again") from None
            keys = ("format", "method", "hparams", "batch_size", "requests_sha256", "model", "geometry")
            changed = [k for k in keys if saved.get(k) != json.loads(json.dumps(settings[k]))]
            given = [k for k in ("layers", "key_position") if settings[k] is not None and saved.get(k) is not None
                     and settings[k] != saved[k]]
            if changed or given:
                raise CheckpointError(f"{self.out} holds another run ({', '.join(changed + given)} differ); use "
                                      "the same requests and settings to resume, or another output directory")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(settings, indent=1))
        rows, _ = self.log.read()
        position = self._read_checkpoint() if (self.out / CHECKPOINT_NAME).exists() else 0
        if len(rows) < position:
            raise CheckpointError(f"{self.log.path} has {len(rows)} rows but the checkpoint is at {position}; the "
                                  f"log was truncated: remove {self.out} to start again")
        for i, row in enumerate(rows[:position]):
            if row.get("position") != i:
                raise CheckpointError(f"{self.log.path} row {i + 1} is out of order (position "
                                      f"{row.get('position')!r}); remove {self.out} to start again")
        redone = len(rows) - position
        if redone:
            self.log.rewrite(rows[:position])  # rows after the checkpoint: their edits are redone
        self._restore_model()
        self.position = self._checkpointed = position
        return position, redone

    def _write_checkpoint(self) -> None:
        """C, the keys and the position, in one safetensors file written to a temporary name and renamed."""
        from safetensors.torch import save_file

        tensors = {f"change.{name}": t.contiguous() for name, t in self._change.items()}
        tensors.update({f"keys.{layer}": k.contiguous() for layer, k in self._keys.items()})
        meta = {"format": FORMAT, "version": str(VERSION), "position": str(self.position),
                "model": str(self.lm.name), "geometry": json.dumps(geometry(self.lm), sort_keys=True),
                "originals": json.dumps(self._originals, sort_keys=True), "layers": json.dumps(self.layers),
                "key_position": json.dumps(self.key_position),
                "facts": json.dumps([[f.subject, f.prompt, f.target, f.relation] for f in self._facts]),
                "new_targets": json.dumps(self._targets),
                "sha256": json.dumps({k: tensor_sha256(v) for k, v in tensors.items()}, sort_keys=True)}
        self.out.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT_NAME}.", dir=self.out)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.out / CHECKPOINT_NAME)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._checkpointed = self.position

    def _read_checkpoint(self) -> int:
        """Read and check the checkpoint against the (unedited) model, keeping its state; returns its position."""
        from safetensors import safe_open

        from locedit.core.facts import Fact

        path = self.out / CHECKPOINT_NAME
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, not {FORMAT!r}")
            sums = json.loads(meta["sha256"])
            bad = sorted(k for k in set(sums) | set(tensors) if sums.get(k) != (tensor_sha256(tensors[k])
                                                                                if k in tensors else None))
            if bad:
                raise ValueError(f"tensor {bad[0]} does not match its checksum")
            position = int(meta["position"])
            originals = json.loads(meta["originals"])
            geo = json.loads(meta["geometry"])
            layers, key_position = json.loads(meta["layers"]), json.loads(meta["key_position"])
            facts = [Fact(s, p, t, r) for s, p, t, r in json.loads(meta["facts"])]
            targets = json.loads(meta["new_targets"])
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is refused the same way
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"checkpoint {path} is corrupt ({reason}); remove {self.out} to start "
                                  "again") from None
        if geo != json.loads(json.dumps(geometry(self.lm), sort_keys=True)):
            raise CheckpointError(f"checkpoint {path} was written for another model ({meta.get('model')!r})")
        params = dict(self.lm.model.named_parameters())
        for name, sha in originals.items():
            if name not in params or tensor_sha256(params[name]) != sha:
                raise CheckpointError(f"checkpoint {path} needs the unedited model, but {self.lm.name!r}'s {name} "
                                      "differs from the one the session started from")
        self._originals = originals
        self._change = {k[len("change."):]: v for k, v in tensors.items() if k.startswith("change.")}
        self._keys = {int(k[len("keys."):]): v for k, v in tensors.items() if k.startswith("keys.")}
        self._facts, self._targets = facts, targets
        if self.layers is not None and layers is not None and self.layers != layers:
            raise CheckpointError(f"checkpoint {path} edits layers {layers}, not the layers {self.layers} given")
        if self.layers is None:
            self.layers = layers
        if self.key_position is None:
            self.key_position = key_position
        return position

    def _restore_model(self) -> None:
        """Apply the change read from the checkpoint to the model (after every check passed)."""
        if not self._change:
            return
        self._apply_cumulative()
        if self._needs_stats():
            from locedit.editing.stats import key_statistics

            try:
                with unedited(self.lm):
                    self._stats = key_statistics(self.lm, layers=self.layers, kinds=("mlp",), corpus=self.corpus,
                                                 tokens=self.params.stats_tokens, progress=False)
            except BaseException:
                self.revert()  # the model is left as it was given
                raise
