"""The engine: loads one model onto one device and executes forward batches.

    engine = Engine(EngineConfig(model="pie/tiny-random", device="cpu"))
    result = engine.forward_batch(ForwardBatch([...]))

A bad batch raises `BatchError` before any device work, and the engine keeps
serving. Every problem that belongs to one request (a value out of range, a
malformed mask, a value the host cannot even convert) is a `BatchError` whose
message starts with "request i": the runtime retries such a batch's passes one
by one, so only the culprit fails. Any other exception is the engine's own
fault, not a request's.

A step synchronises with the device once: its inputs go up in one packed
int32 copy, its results come down in one (`pie.engine.transfer`). The runtime decides every page; the engine only reads and writes the
slots it is told.

With `tensor_parallel_size > 1` one Engine runs on every rank of a
`pie.engine.parallel.TPGroup` (see `pie.engine.worker`): each holds its slice
of the weights and its kv heads' share of every page, every rank runs every
batch, and the results (computed from all-gathered logits) are the same on
every rank.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pie.engine import memory
from pie.engine.adapters import AdapterInfo, AdapterTable
from pie.engine.attention.base import AttentionShape, create_backend, resolve_backend_name
from pie.engine.batch import BatchResult, ForwardBatch, OutputSpec, OutputValue, Request, Sampler
from pie.engine.batch_prep import Limits, PreparedBatch, check_page_ops, prepare
from pie.engine.config import EngineConfig
from pie.engine.cuda_ops import KVAppend
from pie.engine.device import resolve_activation_dtype, resolve_device
from pie.engine.forward_context import ForwardContext
from pie.engine.graphs import GraphRunner
from pie.engine.info import EngineInfo
from pie.engine.kv_cache import KVCache, KVShape, SwapPool
from pie.engine.layers.linear import Linear
from pie.engine.layers.lora import EXTRAS_KEY as LORA_EXTRAS
from pie.engine.layers.lora import LoRABatch
from pie.engine.layers.quant import QUANT_MODES
from pie.engine.loader import build_model, checkpoint_files, init_dummy_weights, load_weights
from pie.engine.models.decoder import CausalLM
from pie.engine.models.registry import get_architecture
from pie.engine.outputs import compute_outputs, decode_outputs, decode_steps
from pie.engine.packing import Results, Sections
from pie.engine.parallel import SINGLE, TPGroup
from pie.engine.state_pool import RECURRENT_EXTRAS, RecurrentBatch, StatePool, StateShape, StateSwapPool
from pie.engine.transfer import Staging
from pie.engine.vision.encoder import PlacedEmbeds, VisionEncoder
from pie.engine.vision.info import ImageInfo
from pie.errors import BatchError, ConfigError, UnsupportedModelError
from pie.model_source import resolve_model_dir

_log = logging.getLogger(__name__)


def load_hf_config(model_dir: Path) -> object:
    """The checkpoint's config through transformers' own config class (its defaults included)."""
    import json

    from transformers import AutoConfig

    model_type = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
    get_architecture(model_type)  # unsupported types fail here with the list of supported ones
    return AutoConfig.from_pretrained(str(model_dir))


class Engine:
    def __init__(self, config: EngineConfig, progress: Callable[[int, int], None] | None = None,
                 tp: TPGroup = SINGLE) -> None:
        if tp.size != config.tensor_parallel_size:
            raise ConfigError(f"tensor_parallel_size = {config.tensor_parallel_size} but this engine was given a "
                              f"group of {tp.size} rank(s); run it through pie.runtime.worker_client.WorkerEngine "
                              f"(one worker process per rank), or set tensor_parallel_size = 1")
        self.config, self.tp = config, tp
        self.device = resolve_device(config.device)
        self.model_dir = resolve_model_dir(config.model, revision=config.revision)
        hf_config = load_hf_config(self.model_dir)
        self.dtype = resolve_activation_dtype(config.activation_dtype, hf_config, self.device)
        self.model = self._load_model(hf_config, progress)
        self.vision = self._load_vision(hf_config)
        self.adapters = AdapterTable(self.model, config.max_num_adapters, config.max_adapter_rank, self.device,
                                     self.dtype)
        spec = self.model.spec  # this rank's heads: the pool and the backend hold num_local_kv_heads
        # Hybrids: only the full-attention layers have KV; the recurrent layers' state lives in `self.states`.
        self.state_shape: StateShape | None = self.model.state_shape(self.dtype)
        self.kv_shape = KVShape(spec.num_kv_layers, spec.num_local_kv_heads, spec.head_dim, config.kv_page_size,
                                self.dtype)
        backend_name = resolve_backend_name(config.attention_backend, self.device)
        attn_shape = AttentionShape(spec.num_local_heads, spec.num_local_kv_heads, spec.head_dim,
                                    config.kv_page_size, self.dtype, self.device)
        options = {"paged": config.cpu_paged_attention} if backend_name == "torch_ref" else {}
        self.backend = create_backend(backend_name, attn_shape, self.model.attention_layer_specs(), **options)
        # CUDA with FlashInfer: the page table travels in the step's upload, K/V go in by FlashInfer's append.
        self._cuda_ops = self.device.type == "cuda" and backend_name == "flashinfer"
        self._rng = random.Random(config.seed)
        self.staging = Staging(self.device)
        self.graphs: GraphRunner | None = None  # captured after the pool exists; the sizing dry run is eager
        num_slots = self._num_state_slots()
        num_pages = self._size_kv_pool(num_slots)
        # One page more than the runtime sees: the scratch page that CUDA-graph padding rows write to.
        self.kv = KVCache(self.kv_shape, num_pages + 1, self.device)
        self.states = StatePool(self.state_shape, num_slots, self.device) if self.state_shape else None
        self.graphs = self._capture_graphs(num_pages) if config.use_cuda_graphs else None
        self.swap = self._swap_pool()
        self.state_swap = (StateSwapPool(self.state_shape, config.state_swap_pool_size, self.device)
                           if self.state_shape and config.state_swap_pool_size else None)
        self.limits = Limits(num_pages, config.kv_page_size, spec.vocab_size, config.max_batch_tokens,
                             config.max_batch_size, config.max_dist_size, config.max_num_embeds,
                             self.swap.num_slots if self.swap else 0, num_state_slots=num_slots,
                             num_state_swap_slots=self.state_swap.num_slots if self.state_swap else 0)
        self.info = EngineInfo(
            model_name=config.model, model_dir=str(self.model_dir),
            model_type=str(getattr(hf_config, "model_type", "")), device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."), attention_backend=backend_name, num_pages=num_pages,
            page_size=config.kv_page_size, vocab_size=spec.vocab_size, num_layers=spec.num_layers,
            max_batch_tokens=config.max_batch_tokens, max_batch_size=config.max_batch_size,
            max_dist_size=config.max_dist_size, max_num_embeds=config.max_num_embeds,
            kv_bytes_per_page=self.kv_shape.bytes_per_page,
            num_swap_slots=self.swap.num_slots if self.swap else 0, tensor_parallel_size=tp.size,
            num_state_slots=num_slots,
            state_bytes_per_slot=self.state_shape.bytes_per_slot if self.state_shape else 0,
            num_state_swap_slots=self.limits.num_state_swap_slots,
        )

    def _load_model(self, hf_config: object, progress: Callable[[int, int], None] | None) -> CausalLM:
        cls = get_architecture(str(getattr(hf_config, "model_type", "")))
        model = build_model(cls, hf_config, self.dtype, self.device, self.tp)
        self._mark_quantized(model)
        if self.config.dummy_weights:
            init_dummy_weights(model, self.config.seed)
        else:
            load_weights(model, checkpoint_files(self.model_dir), progress)
        model.prepare(self.device)
        return model

    def _load_vision(self, hf_config: object) -> VisionEncoder | None:
        """The vision tower of an image-text family pie runs images for (None: text only)."""
        cfg = self.config
        files = [] if cfg.dummy_weights else checkpoint_files(self.model_dir)
        vision = VisionEncoder.load(self.model_dir, hf_config, self.model, files, self.dtype, self.device,
                                    cfg.dummy_weights, cfg.seed, cfg.image_cache_mb)
        if vision is not None and self.tp.size > 1:
            return None  # the tower is not sharded; images are refused (prepare_image) under tensor parallelism
        return vision

    def prepare_image(self, data: bytes, max_pixels: int = 0) -> ImageInfo:
        """Decode and prepare an image (PNG/JPEG/...) for `Request.images`; InputError for bad bytes or an
        image over `max_pixels` (width x height; 0 = the decoder's own limit)."""
        if self.vision is None:
            raise UnsupportedModelError(f"model_type {self.info.model_type!r} takes no images here (text only"
                                        f"{', or tensor_parallel_size > 1' if self.tp.size > 1 else ''})")
        return self.vision.prepare(data, max_pixels)

    def prepare_audio(self, data: bytes, max_seconds: float = 0.0) -> ImageInfo:
        """Decode (WAV) and featurise an audio clip for `Request.images` (which places clips as it places
        images); InputError for bad bytes or a clip over `max_seconds` (0 = the model's own limit)."""
        if self.vision is None or not self.vision.serves_audio:
            raise UnsupportedModelError(f"model_type {self.info.model_type!r} takes no audio here (pie runs the "
                                        "audio tower of Gemma 4 checkpoints with an audio_config"
                                        f"{'; not under tensor_parallel_size > 1' if self.tp.size > 1 else ''})")
        return self.vision.prepare_audio(data, max_seconds)

    def _swap_pool(self) -> SwapPool | None:
        """The host pool for suspended contexts: swap_pool_size pages, or cpu_mem_budget_in_gb of them."""
        cfg = self.config
        slots = cfg.swap_pool_size or int(cfg.cpu_mem_budget_in_gb * memory.GiB) // self.kv_shape.bytes_per_page
        return SwapPool(self.kv_shape, slots, self.device) if slots > 0 else None

    def _mark_quantized(self, model: CausalLM) -> None:
        """Ask every projection (not the LM head) to quantise itself once loaded, per weight_dtype."""
        cfg = self.config
        mode = cfg.weight_dtype if cfg.weight_dtype in QUANT_MODES else ""
        if cfg.runtime_quant == "fp8":
            if mode and mode != "float8":
                raise ConfigError(f"runtime_quant = 'fp8' quantises weights to float8 itself; it cannot be "
                                  f"combined with weight_dtype = {mode!r}. Set one of them.")
            mode = "float8"
        if not mode:
            return
        for name, module in model.named_modules():
            if isinstance(module, Linear) and not name.endswith("lm_head"):
                module.quant_mode = mode
                module.fp8_activations = cfg.runtime_quant == "fp8"

    def _capture_graphs(self, num_pages: int) -> GraphRunner | None:
        """The graph runner, or None with a warning when this engine cannot replay graphs: the configs that
        install.sh and `pie config init` write on a CUDA flavor turn graphs on for whatever model is then
        configured, and a model that cannot use them must still serve (eagerly)."""
        reason = self.graph_refusal()
        if reason is not None:
            _log.warning("use_cuda_graphs = true, but %s; decode steps run eagerly (set use_cuda_graphs = false "
                         "to silence this)", reason)
            return None
        return GraphRunner(self.model, self.backend, self.kv, scratch_page=num_pages,
                           max_batch_size=min(self.config.max_batch_size, 256), max_pages_per_batch=num_pages)

    def graph_refusal(self) -> str | None:
        """Why this engine cannot capture CUDA graphs, or None when it can."""
        model_type = getattr(self.model.hf_config, "model_type", "")
        if self.device.type != "cuda" or not self.backend.supports_cuda_graphs:
            return (f"CUDA graphs need a CUDA device and the flashinfer attention backend, and this engine runs "
                    f"{self.backend.name} on {self.device}")
        if self.tp.size > 1:
            return (f"tensor_parallel_size = {self.tp.size}: the captured decode steps would have to include the "
                    "all-reduces")
        if any(s.sinks for s in self.model.attention_layer_specs()):
            return f"model_type {model_type!r} has attention sinks, which FlashInfer's graph-mode kernels do not take"
        if not self.model.supports_cuda_graphs():
            return f"model_type {model_type!r} reads per-expert token counts on the host in its forward"
        return None

    def _num_state_slots(self) -> int:
        """Hybrids: max_num_state_slots, else 2 x max_batch_size capped at half the budget (0 for dense models).

        On CUDA the cap reads free memory now, before the dry run: the slots are decided first, so the dry run
        can use as many and the pages get what is left.
        """
        shape, cfg = self.state_shape, self.config
        if shape is None:
            return 0
        if cfg.max_num_state_slots:
            return cfg.max_num_state_slots
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            budget = int(torch.cuda.mem_get_info(self.device)[0] * cfg.gpu_mem_utilization)
        else:
            budget = int(cfg.cpu_kv_budget_gb * memory.GiB)
        return min(2 * cfg.max_batch_size, shape.slots_for_budget(budget // 2))

    def _size_kv_pool(self, num_state_slots: int) -> int:
        cfg = self.config
        state_bytes = num_state_slots * self.state_shape.bytes_per_slot if self.state_shape else 0
        if self.device.type != "cuda":
            budget = int(cfg.cpu_kv_budget_gb * memory.GiB)
            return self._pages_after_states(budget, state_bytes, num_state_slots)
        scratch_pages = math.ceil(cfg.max_batch_tokens / cfg.kv_page_size) + 1
        # The dry run's widest decode batch names one state slot per row (no more rows than slots exist).
        scratch_slots = min(cfg.max_batch_size, cfg.max_batch_tokens, num_state_slots)
        scratch_bytes = scratch_pages * self.kv_shape.bytes_per_page
        if self.state_shape:
            scratch_bytes += scratch_slots * self.state_shape.bytes_per_slot

        def dry_run() -> None:  # the scratch pools live only inside the measured region
            states = StatePool(self.state_shape, scratch_slots, self.device) if self.state_shape else None
            self._dry_run(KVCache(self.kv_shape, scratch_pages, self.device), states)

        budget, _ = memory.measure_cuda_budget(self.device, cfg.gpu_mem_utilization, dry_run, scratch_bytes)
        num_pages = self._pages_after_states(budget, state_bytes, num_state_slots)
        return self.tp.min_int(num_pages, self.device)  # a page id must be valid on every rank

    def _pages_after_states(self, budget: int, state_bytes: int, num_state_slots: int) -> int:
        """The KV pages that fit in `budget` once the state pool's bytes are taken; a ConfigError naming both."""
        cfg = self.config
        if state_bytes and budget - state_bytes < self.kv_shape.bytes_per_page:
            raise ConfigError(f"the recurrent-state pool ({num_state_slots} slots x {state_bytes // num_state_slots} "
                              f"bytes = {state_bytes / memory.GiB:.3f} GiB) leaves no room for KV pages in the "
                              f"budget of {max(budget, 0) / memory.GiB:.3f} GiB (one page: "
                              f"{self.kv_shape.bytes_per_page} bytes); lower max_num_state_slots or raise "
                              "gpu_mem_utilization (CUDA) / cpu_kv_budget_gb (CPU/MPS)")
        return memory.num_pages_for(budget - state_bytes, self.kv_shape, cfg.max_num_kv_pages, str(self.device))

    def _dry_run(self, kv: KVCache, states: StatePool | None) -> None:
        """The two largest batches the limits allow: one long prefill, one wide decode."""
        cfg, ps = self.config, self.config.kv_page_size
        n = cfg.max_batch_tokens
        slot = 0 if states else None
        prefill = Request(tokens=[0] * n, positions=list(range(n)), page_ids=list(range(math.ceil(n / ps))),
                          last_page_len=(n - 1) % ps + 1, outputs=[OutputSpec(n - 1, Sampler())], state_slot=slot)
        width = min(cfg.max_batch_size, cfg.max_batch_tokens, states.num_slots if states else cfg.max_batch_size)
        decode = [Request(tokens=[0], positions=[0], page_ids=[i % kv.num_pages], last_page_len=1,
                          outputs=[OutputSpec(0, Sampler("top_p", 1.0, top_p=0.9))],
                          state_slot=i if states else None) for i in range(width)]
        limits = Limits(kv.num_pages, ps, self.model.spec.vocab_size, n, cfg.max_batch_size,
                        cfg.max_dist_size, cfg.max_num_embeds, num_state_slots=states.num_slots if states else 0)
        for batch in (ForwardBatch([prefill]), ForwardBatch(decode)):
            self._execute(prepare(batch, limits, self._rng), kv, states=states)

    @torch.inference_mode()
    def forward_batch(self, batch: ForwardBatch) -> BatchResult:
        t0 = time.perf_counter()
        steps = batch.steps
        if not batch.requests and steps is None:  # page or state operations only (swaps, copies)
            if not (batch.swap_out or batch.swap_in or batch.page_copies or batch.state_copies
                    or batch.state_swap_out or batch.state_swap_in):
                raise BatchError("empty batch: it has no requests and no page operations")
            check_page_ops(batch, self.limits)
            self._page_ops(batch)
            return BatchResult([], {"prepare_ms": (time.perf_counter() - t0) * 1e3, "execute_ms": 0.0})
        prep = prepare(batch, self.limits, self._rng)  # raises BatchError before touching the device
        reqs = batch.requests
        adapters = [r.adapter for r in reqs]
        zo_seeds: list[int | None] = [r.zo_seed for r in reqs]
        if steps is not None:  # decode steps carry adapters (no zo seed: streams refuse one)
            adapters += steps.adapters or [None] * len(steps)
            zo_seeds += [None] * len(steps)
        lora = self.adapters.batch(adapters, prep.layout.qo_indptr, zo_seeds)  # an empty slot, a zo seed without zo: BatchError
        embeds = self._place_images(batch, prep)
        self._page_ops(batch)
        t1 = time.perf_counter()
        outputs, step_tokens = self._execute(prep, self.kv, lora, embeds, self.states)
        t2 = time.perf_counter()
        return BatchResult(outputs, {"prepare_ms": (t1 - t0) * 1e3, "execute_ms": (t2 - t1) * 1e3}, step_tokens)

    def _place_images(self, batch: ForwardBatch, prep: PreparedBatch) -> PlacedEmbeds | None:
        if not any(r.images for r in batch.requests):
            return None
        if self.vision is None:
            i = next(i for i, r in enumerate(batch.requests) if r.images)
            raise BatchError(f"request {i}: has images, but model_type {self.info.model_type!r} takes none here")
        return self.vision.place(batch, prep.layout, prep.positions, self.limits.max_num_embeds)

    def _page_ops(self, batch: ForwardBatch) -> None:
        """Swap-outs, then swap-ins, then copies: the order the batch contract documents."""
        if self.swap is not None:
            self.swap.swap_out(self.kv, batch.swap_out)
            self.swap.swap_in(self.kv, batch.swap_in)
        if batch.page_copies:
            src, dst = zip(*batch.page_copies, strict=True)
            self.kv.copy_pages(list(src), list(dst))
        if self.states is not None:  # the slots were range-checked with the batch (check_page_ops)
            if self.state_swap is not None:
                self.state_swap.swap_out(self.states, batch.state_swap_out)
                self.state_swap.swap_in(self.states, batch.state_swap_in)
            if batch.state_copies:
                src, dst = zip(*batch.state_copies, strict=True)
                self.states.copy(list(src), list(dst))

    @torch.inference_mode()
    def _execute(self, prep: PreparedBatch, kv: KVCache, lora: LoRABatch | None = None,
                 embeds: PlacedEmbeds | None = None,
                 states: StatePool | None = None) -> tuple[list[list[OutputValue]], np.ndarray | None]:
        """(each request's outputs, the decode step rows' tokens or None)."""
        graphed = self.graphs is not None and kv is self.kv and embeds is None  # image rows run eagerly
        bucket = self.graphs.bucket_for(prep, lora is not None) if graphed and self.graphs else None
        layout = prep.layout if bucket is None or self.graphs is None else self.graphs.padded_layout(prep.layout,
                                                                                                    bucket)
        # The step's one upload: token rows and every output parameter (on CUDA with FlashInfer the page
        # table too), split by views on the device.
        upload = prep.packed.with_section("kv_pages", layout.kv_page_indices) if self._cuda_ops else prep.packed
        inp = Sections(upload, self.staging.upload(upload.host))
        if self._cuda_ops:
            layout.device_page_indices = inp.ints("kv_pages")
        packed = inp.longs("token_rows").view(4, -1)  # tokens, positions, write page, write offset
        results = None
        if bucket is not None and self.graphs is not None:
            hidden = self.graphs.run(layout, bucket, packed)
            results = self.graphs.sample(prep.outputs, bucket, inp)  # None: outputs computed eagerly below
        else:
            tokens, positions, w_page, w_off = packed.unbind(0)
            self.backend.plan(layout)
            fwd = ForwardContext(self.backend, kv, positions, w_page, w_off,
                                 self.model.batch_extras(prep.positions, layout, self.device),
                                 max_position=int(prep.positions.max()),
                                 kv_append=KVAppend(w_page, w_off) if self._cuda_ops else None)
            if lora is not None:
                fwd.extras[LORA_EXTRAS] = lora
            if embeds is not None:
                fwd.extras.update(embeds.extras())
            if states is not None:
                assert prep.state_slots is not None and prep.fresh is not None
                fwd.extras[RECURRENT_EXTRAS] = RecurrentBatch(states, prep.layout.qo_indptr.tolist(),
                                                              prep.state_slots, prep.fresh)
            hidden = self.model(tokens, fwd)
        if results is None:
            results = compute_outputs(self.model, hidden, prep.outputs, inp)
        # The step's one download (and its one sync).
        host = self.staging.download(results.tensor(self.device))
        res = Results(results.sections, host)
        return (decode_outputs(prep.outputs, res, self.model.spec.vocab_size, self.model.spec.hidden_size),
                decode_steps(prep.outputs, res))

    # -- LoRA adapters (PEFT directories), selected per request by `Request.adapter` --

    def load_adapter(self, path: str | Path, slot: int | None = None) -> int:
        """Load a PEFT LoRA adapter into `slot` (replacing it) or the lowest free slot; returns the slot.

        Raises AdapterError (bad files, rank over max_adapter_rank, no free slot); the engine keeps serving.
        """
        if self.tp.size > 1:
            raise ConfigError(f"LoRA adapters are not supported with tensor_parallel_size = {self.tp.size} (the "
                              "adapter matrices are not sharded); serve adapters with tensor_parallel_size = 1")
        return self.adapters.load(path, slot)

    def unload_adapter(self, slot: int) -> None:
        self.adapters.unload(slot)

    def fork_adapter(self, slot: int, new_slot: int | None = None) -> int:
        """Copy an adapter into another slot; returns that slot."""
        return self.adapters.fork(slot, new_slot)

    def save_adapter(self, slot: int, path: str | Path) -> None:
        """Write the adapter in `slot` as a PEFT directory."""
        self.adapters.save(slot, path)

    def adapter_info(self, slot: int) -> AdapterInfo:
        return self.adapters.info(slot)

    def zo_initialize(self, slot: int | None, rank: int, alpha: float, population_size: int, mu_fraction: float,
                      initial_sigma: float) -> int:
        """Zeroth-order training state for an adapter (a fresh one when `slot` holds none); returns the slot."""
        if self.tp.size > 1:
            raise ConfigError(f"LoRA adapters are not supported with tensor_parallel_size = {self.tp.size}; serve "
                              "adapters (and zo training) with tensor_parallel_size = 1")
        return self.adapters.zo_initialize(slot, rank, alpha, population_size, mu_fraction, initial_sigma)

    def zo_update(self, slot: int, scores: list[float], seeds: list[int], max_sigma: float) -> None:
        """One evolution-strategy step of the adapter in `slot` from its perturbations' scores."""
        self.adapters.zo_update(slot, scores, seeds, max_sigma)

    # -- page operations used by the runtime outside of forward passes --

    def copy_pages(self, src: list[int], dst: list[int]) -> None:
        self.kv.copy_pages(src, dst)

    def copy_states(self, src: list[int], dst: list[int]) -> None:
        """Hybrids: state slot src[i] -> dst[i] (what `ForwardBatch.state_copies` does inside a batch)."""
        if self.states is None:
            raise BatchError("copy_states: this model keeps no recurrent state")
        self.states.copy(src, dst)


