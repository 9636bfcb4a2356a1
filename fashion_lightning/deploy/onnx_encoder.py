"""The recommender's encoder protocol answered by ONNX Runtime sessions over a checked export folder.

Why: a PyTorch eager forward pass is thousands of Python-level module calls; ONNX Runtime runs the same
graph (fused, constant-folded) in C++. The encoder speaks numpy (``accepts_numpy``): photos come in as
uint8 ``[B, 3, 80, 60]`` arrays and embeddings / logits leave as float32 arrays, so the services, the
index build and the worker processes use it where they used a :class:`FashionModule`.

``threads`` is ONNX Runtime's intra-op pool per session (the services set it per worker process, so
workers x threads stays within the cores); inter-op parallelism is off (one graph at a time).

ONNX Runtime releases the GIL for the whole graph run, so in a server's own threads (``fashion-serve
inference=thread``) a forward pass does not stall searches the way PyTorch eager's module calls do, and no
worker process (with its pickling and five thread / process hand-offs per call) is needed. Callers that
arrive while a pass runs are combined into the next one (:class:`Combiner`, up to ``max_batch`` rows): the
first waiting caller runs it for all, so a lone caller runs its own pass with no hand-off at all.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from fashion_lightning.deploy.bundle import (
    EMBEDDING_OUTPUT,
    IMAGE_INPUT,
    LOGITS_PREFIX,
    TEXT_FILE,
    TEXT_INPUT,
    TOKENIZER_DIR,
    OnnxBundle,
    OnnxBundleError,
    read_bundle,
    require,
)
from fashion_lightning.utils.runtime import ENGINES, engine_of

TEXT_BATCH = 256
MAX_BATCH = 16
RUNTIMES = ENGINES


class Combiner:
    """Concurrent calls of ``run`` (rows in, a list of row-aligned arrays out) combined into shared passes.

    Leader / follower: a caller queues its rows, then waits for a free pass (``passes`` at once); holding one,
    it takes every queued call that fits in ``max_batch`` rows (FIFO; a larger call goes alone), runs them as
    one, and hands each its own rows. A caller whose rows went in someone else's pass just waits for them. A
    combined pass that fails is run again call by call, so an error reaches only the call that causes it.
    """

    def __init__(self, run: Callable[[np.ndarray], list[np.ndarray]], max_batch: int = MAX_BATCH, passes: int = 1):
        self._run = run
        self.max_batch = max(1, int(max_batch))
        self._lock = threading.Lock()
        self._waiting: collections.deque[tuple[np.ndarray, Future[list[np.ndarray]]]] = collections.deque()
        self._passes = threading.Semaphore(max(1, int(passes)))
        self.sizes: collections.deque[int] = collections.deque(maxlen=1000)  # rows per pass, recent ones

    def __call__(self, rows: np.ndarray) -> list[np.ndarray]:
        mine: Future[list[np.ndarray]] = Future()
        with self._lock:
            self._waiting.append((rows, mine))
        while not mine.done():
            with self._passes:
                batch = self._take() if not mine.done() else []
                if batch:
                    self._serve(batch)
            if not batch:  # mine is in a pass that another caller runs now
                break
        return mine.result()

    def _take(self) -> list[tuple[np.ndarray, Future[list[np.ndarray]]]]:
        batch: list[tuple[np.ndarray, Future[list[np.ndarray]]]] = []
        rows = 0
        with self._lock:
            while self._waiting and (not batch or rows + len(self._waiting[0][0]) <= self.max_batch):
                call = self._waiting.popleft()
                batch.append(call)
                rows += len(call[0])
        return batch

    def _serve(self, batch: list[tuple[np.ndarray, Future[list[np.ndarray]]]]) -> None:
        try:
            joined = batch[0][0] if len(batch) == 1 else np.concatenate([rows for rows, _ in batch])
            outputs = self._run(joined)
        except Exception as err:  # noqa: BLE001 - handed to the callers
            if len(batch) == 1:
                batch[0][1].set_exception(err)
            else:  # one call's rows may be the cause: each goes again alone, so only its own caller fails
                for call in batch:
                    self._serve([call])
            return
        except BaseException as err:  # interrupted: nobody may wait for rows that never come
            for _, answer in batch:
                answer.set_exception(err)
            raise
        self.sizes.append(len(joined))
        start = 0
        for rows, answer in batch:
            answer.set_result([out[start : start + len(rows)] for out in outputs])
            start += len(rows)


class OnnxEncoder:
    """See module doc. ``precision``: ``fp32`` (default) or ``int8`` (an export made with ``quantize=``)."""

    accepts_numpy = True

    def __init__(
        self, bundle: OnnxBundle, threads: int | None = None, precision: str = "fp32", max_batch: int = MAX_BATCH
    ) -> None:
        ort = require("onnxruntime")
        self.bundle = bundle
        self.embedding_name = bundle.embedding_name
        self.tasks = list(bundle.tasks)
        self.precision = precision
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = max(0, int(threads or 0))  # 0: ONNX Runtime's default (all cores)
        self._options.inter_op_num_threads = 1
        self._options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._options.log_severity_level = 3
        self.image = self._session(bundle.image_file(precision))
        self._check_image_io()
        self.text = self._session(TEXT_FILE) if bundle.text else None
        self._tokenizer: Any = None
        self.max_batch = max(1, int(max_batch))  # fashion-serve lets this many photos per pass reach it at once
        self._image_pass = Combiner(lambda x: self.image.run(self._outputs, {IMAGE_INPUT: x}), self.max_batch)
        text = self.text
        self._text_pass = (
            Combiner(lambda t: text.run([EMBEDDING_OUTPUT], {TEXT_INPUT: t}), TEXT_BATCH) if text is not None else None
        )

    def _session(self, name: str) -> Any:
        """A CPU session from the graph's verified bytes (a path would let the graph name external files)."""
        ort = require("onnxruntime")
        data = self.bundle.graph(name)
        refuse_external_data(data, self.bundle.root / name)
        try:
            return ort.InferenceSession(data, self._options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - ORT raises its own types for unparsable / invalid graphs
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise OnnxBundleError(f"{self.bundle.root / name}: ONNX Runtime cannot load it: {first}") from None

    def _check_image_io(self) -> None:
        """The graph's inputs and outputs are what the manifest says (names, dims, class counts)."""
        where = self.bundle.root
        inputs = self.image.get_inputs()
        hw = list(self.bundle.preprocess.native_hw)
        if len(inputs) != 1 or inputs[0].name != IMAGE_INPUT or inputs[0].type != "tensor(uint8)":
            raise OnnxBundleError(f"{where}: the image graph does not take one uint8 input named {IMAGE_INPUT!r}")
        if list(inputs[0].shape[1:]) != [3, *hw]:
            raise OnnxBundleError(f"{where}: the image graph takes {inputs[0].shape}, the manifest says [B, 3, {hw}]")
        outputs = {o.name: o.shape for o in self.image.get_outputs()}
        expected = {EMBEDDING_OUTPUT: self.bundle.embed_dim} | {
            f"{LOGITS_PREFIX}{task}": len(labels) for task, labels in self.bundle.tasks.items()
        }
        for name, size in expected.items():
            shape = outputs.get(name)
            if shape is None or len(shape) != 2 or shape[1] != size:
                raise OnnxBundleError(
                    f"{where}: the image graph's output {name} is {shape}, the manifest says [B, {size}]"
                )
        self._outputs = list(expected)

    # -- images -----------------------------------------------------------------------------------
    def _images(self, images: Any) -> np.ndarray:
        array = images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
        hw = self.bundle.preprocess.native_hw
        if array.dtype != np.uint8 or array.ndim != 4 or tuple(array.shape[1:]) != (3, *hw):
            raise ValueError(f"expected uint8 photos [B, 3, {hw[0]}, {hw[1]}], got {array.dtype} {array.shape}")
        return np.ascontiguousarray(array)

    def image_outputs(self, images: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Embeddings ``[B, D]`` and per-task logits of uint8 photos, one run of the graph."""
        array = self._images(images)
        if not len(array):
            return np.empty((0, self.bundle.embed_dim), np.float32), {
                t: np.empty((0, len(labels)), np.float32) for t, labels in self.bundle.tasks.items()
            }
        embedding, *logits = self._image_pass(array)
        return embedding, dict(zip(self.tasks, logits))

    def embed_images(self, images: Any) -> np.ndarray:
        return self.image_outputs(images)[0]

    def decode(self, logits: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
        return {task: [self.bundle.tasks[task][int(i)] for i in out.argmax(axis=1)] for task, out in logits.items()}

    def predict_attributes(self, images: Any) -> dict[str, list[str]]:
        return self.decode(self.image_outputs(images)[1])

    def embed_and_predict(self, images: Any) -> tuple[np.ndarray, dict[str, list[str]]]:
        embedding, logits = self.image_outputs(images)
        return embedding, self.decode(logits)

    # -- texts ------------------------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        return self.text is not None

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.bundle)
        return np.ascontiguousarray(self._tokenizer([str(t) for t in texts]).numpy().astype(np.int64))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> L2-normalised embeddings, in batches of up to 256 (one graph run each)."""
        if self.text is None:
            raise NotImplementedError(f"{self.embedding_name} has no text encoder; use a CLIP export for text queries")
        texts = [str(t) for t in texts]
        assert self._text_pass is not None
        parts = [self._text_pass(self.tokenize(texts[i : i + TEXT_BATCH]))[0] for i in range(0, len(texts), TEXT_BATCH)]
        return np.concatenate(parts) if parts else np.empty((0, self.bundle.embed_dim), np.float32)

    def embed_items(self, images: Any, texts: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Catalog items as ``FashionModule.embed_items`` embeds them (CLIP: image and text fused by alpha)."""
        image = self.embed_images(images)
        if self.text is None:
            return {"embedding": image}
        if texts is None:
            return {"embedding": image, "image_embedding": image}
        text = self.embed_texts(texts)
        return {"embedding": fuse(image, text, float(self.bundle.alpha or 0.0)), "image_embedding": image,
                "text_embedding": text}  # fmt: skip


def fuse(image: np.ndarray, text: np.ndarray, alpha: float) -> np.ndarray:
    """``models.clip.fuse`` in numpy: normalise the parts, mix by ``alpha``, normalise again."""

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    return unit(alpha * unit(image.astype(np.float32)) + (1.0 - alpha) * unit(text.astype(np.float32)))


def load_tokenizer(bundle: OnnxBundle) -> Any:
    """The CLIP tokenizer rebuilt from the folder's own files (parsed as data; no remote code, no hub)."""
    assert bundle.text is not None
    from fashion_lightning.models import offline_weights

    spec = bundle.text["tokenizer"]
    folder = bundle.root / TOKENIZER_DIR
    context = int(bundle.text["context_length"])
    try:
        if spec["kind"] == "hf":
            from open_clip.tokenizer import HFTokenizer

            with offline_weights.offline_hub():
                return HFTokenizer(str(folder), context_length=context)
        from open_clip.tokenizer import SimpleTokenizer

        name = spec.get("bpe_file")
        if not isinstance(name, str) or f"{TOKENIZER_DIR}/{name}" not in bundle.files:
            raise OnnxBundleError(f"{bundle.root}: the manifest's bpe_file is not one of its listed files")
        return SimpleTokenizer(bpe_path=str(folder / name), context_length=context)
    except OnnxBundleError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers / open_clip raise many types for bad files
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise OnnxBundleError(f"{folder}: cannot load the tokenizer: {type(err).__name__}: {first}") from None


def load_onnx_encoder(
    onnx_dir: str | Path, threads: int | None = None, precision: str | None = None, identity: str | None = None
) -> OnnxEncoder:
    """The encoder of an export folder, after checking it (manifest, sha256, bounds) and, when ``identity``
    is given, that it was exported from that model (an index's ``model_identity``)."""
    bundle = read_bundle(onnx_dir)
    if identity is not None and bundle.model_identity != identity:
        raise OnnxBundleError(
            f"{bundle.root} was exported from another model (weights sha256 {bundle.model_identity[:12]}...) than "
            f"the index's ({str(identity)[:12]}...); export the index's model with fashion-export"
        )
    return OnnxEncoder(bundle, threads=threads, precision=precision or "fp32")


def refuse_external_data(data: bytes, where: Path) -> None:
    """A graph whose tensors live in other files (ONNX "external data") is refused before ONNX Runtime sees it:
    fashion-export writes none, and a crafted graph must not make the runtime read a file that the folder's
    checksums do not cover. The graph is only parsed (protobuf), every nested graph walked iteratively."""
    onnx = require("onnx")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise OnnxBundleError(f"{where}: not an ONNX graph ({type(err).__name__})") from None
    graphs, tensors = [model.graph], []
    while graphs:
        graph = graphs.pop()
        tensors += list(graph.initializer)
        tensors += [t for sparse in graph.sparse_initializer for t in (sparse.values, sparse.indices)]
        for node in graph.node:
            for attribute in node.attribute:
                tensors += [attribute.t, *attribute.tensors]
                graphs += [attribute.g, *attribute.graphs] if attribute.HasField("g") else list(attribute.graphs)
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise OnnxBundleError(f"{where}: tensor {tensor.name[:80]!r} points at an external file; refused")


def check_runtime(runtime: Any, onnx_dir: Any) -> str | None:
    """Validate a config's ``runtime`` / ``onnx_dir`` pair: the onnx_dir to use, or None for PyTorch."""
    from fashion_lightning.utils.config_check import ConfigError

    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime={runtime!r}: must be one of {', '.join(RUNTIMES)}")
    if runtime == "torch":
        return None
    if not onnx_dir:
        raise ConfigError("runtime=onnx needs onnx_dir=<folder written by fashion-export>")
    require("onnxruntime")
    return str(onnx_dir)


def encoder_loader(cfg: Any, identity: Any) -> Callable[[], OnnxEncoder] | None:
    """What an app's ``runtime`` / ``onnx_dir`` / ``onnx_threads`` / ``onnx_precision`` keys ask for: None for
    PyTorch, else a picklable loader of the export (checked now, so a bad folder fails before any work)
    that must have been exported from the model with ``identity`` (the index's ``model_identity``)."""
    onnx_dir = check_runtime(engine_of(cfg), cfg.get("onnx_dir"))
    if onnx_dir is None:
        return None
    if not isinstance(identity, str):
        raise OnnxBundleError(
            "runtime=onnx: the index records no model identity, so the export cannot be matched to it"
        )
    threads = cfg.get("onnx_threads")
    precision = cfg.get("onnx_precision") or "fp32"
    bundle = read_bundle(onnx_dir)
    bundle.image_file(precision)  # refuses an unknown precision, or int8 that was not exported
    if bundle.model_identity != identity:
        load_onnx_encoder(onnx_dir, identity=identity)  # raises the one-line mismatch error
    return functools.partial(load_onnx_encoder, onnx_dir, int(threads) if threads else None, precision, identity)
