"""The handle ``mf.compile`` returns: the injected adapter, its parameters, its aux loss,
and ``remove()``."""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import typing
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..backends.runtime.dist import WORLD, all_sum_, group_of, rank_in, rank_seed
from ..backends.torch_fx.lower import counts_name
from ..errors import CheckpointError
from ..interop.own_format import save
from ..ir import Route
from ..report.explain import explain_plan
from .handle_inference import InferenceControls
from .inject import AuxCollector, get_submodule_parent
from .routing_log import RoutingLog
from .task_ids import task_id_hooks
from .tasks import ContinualTasks

if TYPE_CHECKING:
    from ..compiler.planner import Plan

__all__ = ["AdapterHandle", "dtype_mismatches"]


def _shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss predicts ``labels[..., 1:]`` (causal LMs), as the HF Trainer counts
    ``num_items_in_batch``."""
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:
        return False
    config = getattr(model, "config", None)
    return (LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
            and not getattr(config, "is_encoder_decoder", False))


def _token_share(kwargs: dict, shifts_labels: bool) -> torch.Tensor | None:
    """``n / N``: this batch's counted label tokens over ``num_items_in_batch``; ``None`` without both."""
    total = kwargs.get("num_items_in_batch")
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = kwargs.get("labels")
        if labels is not None and shifts_labels:
            labels = labels[..., 1:]
    if total is None or labels is None:
        return None
    return labels.ne(-100).sum() / total


def _attention_mask_position(model: nn.Module) -> int | None:
    """Where ``attention_mask`` sits among the positional arguments of ``model.forward``
    (``None``: the model takes none, or is an encoder-decoder, whose decoder sites see other
    tokens than the encoder's mask covers)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return None
    try:
        names = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("attention_mask") if "attention_mask" in names else None


def _padding_mask(args: tuple, kwargs: dict, position: int | None) -> torch.Tensor | None:
    """The call's ``attention_mask`` ``(batch, seq)`` as bool when it marks padding; ``None``
    without one, for an all-ones mask (the exact unmasked path) and for masks of another shape
    (4D attention masks). Under ``torch.compile`` the all-ones check (a data-dependent branch)
    is skipped: the masked computation gives the same losses up to rounding."""
    if position is None:
        return None
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > position:
        mask = args[position]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    real = mask != 0
    if not torch.compiler.is_compiling() and bool(real.all()):
        return None
    return real


_WITH_AUX: dict[type, tuple[type, tuple[str, ...]]] = {}
"""Output class -> (its subclass that declares ``aux_loss``, the class's field names); see
:func:`_output_with_aux`."""


def _aux_output_class(cls: type) -> tuple[type, tuple[str, ...]]:
    """``cls`` itself when its dataclass fields hold ``aux_loss`` (Mixtral's outputs), else a
    subclass declaring ``aux_loss: Tensor | None = None``, made once per class and kept in this
    module's namespace under a unique name (so it pickles); with ``cls``'s field names."""
    if cls in _WITH_AUX:
        return _WITH_AUX[cls]
    names = tuple(f.name for f in dataclasses.fields(cls))
    if "aux_loss" in names:
        _WITH_AUX[cls] = (cls, names)
        return _WITH_AUX[cls]
    name, n = f"{cls.__name__}WithAuxLoss", 1
    while name in globals():
        n += 1
        name = f"{cls.__name__}WithAuxLoss{n}"
    sub = type(name, (cls,), {"__annotations__": {"aux_loss": "torch.Tensor | None"}, "aux_loss": None,
                              "__module__": __name__, "__qualname__": name,
                              "__doc__": f"{cls.__name__} with the adapter's ``aux_loss`` (added by moleforge)."})
    globals()[name] = dataclasses.dataclass(sub)
    _WITH_AUX[cls] = (globals()[name], names)
    return _WITH_AUX[cls]


def _prepare_output_classes(model: nn.Module) -> None:
    """Make the ``aux_loss`` subclasses of the output classes ``model.forward`` declares it returns
    now, not in the forward hook, where ``torch.compile`` cannot trace making a class."""
    try:
        ret = typing.get_type_hints(model.forward).get("return")
    except Exception:  # noqa: BLE001 - unresolvable annotations: the hook makes them on first use
        return
    for cls in typing.get_args(ret) or (ret,):
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and issubclass(cls, dict):
            _aux_output_class(cls)


def _output_with_aux(output: Any, aux: torch.Tensor) -> Any:
    """``output`` with ``aux_loss = aux``.

    A HuggingFace ``ModelOutput`` is a dataclass that ``torch.utils._pytree`` rebuilds as
    ``type(output)(**items)`` (DDP does with ``find_unused_parameters=True``, as the HF Trainer
    sets it): a key its class does not declare makes that call fail. So the output becomes an
    instance of a subclass declaring ``aux_loss`` (``isinstance`` checks still hold); plain
    dicts get the key; anything else is returned as is. Under ``torch.compile`` an output class
    whose subclass was not made beforehand (see :func:`_prepare_output_classes`) gets the key."""
    if not hasattr(output, "keys"):
        return output
    known = _WITH_AUX.get(type(output))
    if known is None and dataclasses.is_dataclass(output) and not torch.compiler.is_compiling():
        known = _aux_output_class(type(output))
    if known is not None and known[0] is not type(output):
        cls, names = known
        output = cls(**{n: getattr(output, n) for n in names})
    output["aux_loss"] = aux
    return output


def _install_save_pretrained(model: nn.Module, handle: "AdapterHandle") -> bool:
    """Shadow ``save_pretrained`` on this model instance only (not its class), undone by ``remove()``."""
    if not callable(getattr(model, "save_pretrained", None)) or "save_pretrained" in vars(model):
        return False
    model.save_pretrained = handle._save_pretrained  # type: ignore[method-assign]
    return True


_SAVED_FLOATS = (torch.float32, torch.float64)
"""The dtypes ``mf.save`` writes adapter tensors in: float32, or float64 for a float64 model."""


def dtype_mismatches(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> list[str]:
    """One line per saved tensor whose dtype the adapter would have to cast it from: anything but
    the adapter's own dtype, except float32 and float64 for one another (what a float32 and a
    float64 model store). A float16 or bfloat16 file was converted after saving and has lost
    precision; loading it silently would hide that."""
    problems = []
    for key, t in saved.items():
        want = own.get(key)
        if want is None or t.dtype == want.dtype or (t.dtype in _SAVED_FLOATS and want.dtype in _SAVED_FLOATS):
            continue
        problems.append(f"{key}: saved as {t.dtype}, this adapter stores it as {want.dtype}; moleforge saves "
                        f"adapters in float32 (float64 for float64 models): convert the file's tensors back to "
                        f"{want.dtype} or save the adapter again with mf.save")
    return problems


def _like(own: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor) laid out as ``own``: sharded as ``own`` is when it is an FSDP2
    ``DTensor`` (each rank keeps its shard of its own copy, no communication), else as is."""
    mesh = getattr(own, "device_mesh", None)
    if mesh is None or not hasattr(own, "placements"):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(own.device_mesh.device_type), mesh, own.placements, src_data_rank=None)


def _model_key(key: str) -> str:
    """The model's state-dict key of a handle state-dict key ``module.param``: the site's tensors
    live in the adapted module's ``site``."""
    module, _, param = key.rpartition(".")
    return f"{module}.site.{param}"


_DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"
"""The model attribute ``DistributedDataParallel`` reads, when it wraps the model, for the names of
the parameters and buffers it leaves alone."""


def _ignore_counts_in_ddp(model: nn.Module, names: list[str]) -> list[str]:
    """Keep DDP from broadcasting the selection-count buffers from rank 0 before every forward
    (it does so with every buffer), which would replace each rank's counts by rank 0's;
    :meth:`AdapterHandle.update_balancing` sums them over the ranks instead. Returns the names
    added to the model's ignore list (already listed names are left to their owner)."""
    if not names:
        return []
    listed = list(getattr(model, _DDP_IGNORE, None) or [])
    added = [n for n in names if n not in listed]
    setattr(model, _DDP_IGNORE, listed + added)
    return added


def _unignore_in_ddp(model: nn.Module, added: list[str]) -> None:
    if not added or not hasattr(model, _DDP_IGNORE):
        return
    rest = [n for n in getattr(model, _DDP_IGNORE) if n not in set(added)]
    if rest:
        setattr(model, _DDP_IGNORE, rest)
    else:
        delattr(model, _DDP_IGNORE)


class AdapterHandle(ContinualTasks, InferenceControls):
    """A compiled adapter living inside ``model``.

    While it is injected, the model's forward adds the aux losses to ``outputs.loss`` (see
    ``_post_hook``), and ``model.save_pretrained(dir)`` (so ``Trainer.save_model``) writes this
    adapter as ``mf.save`` does; ``remove()`` undoes both.

    Padding: when the model is called with an ``attention_mask`` ``(batch, seq)`` (1 = real
    token, 0 = padding), the aux losses, the balancing routers' selection counts and the recorded
    routing count the real tokens only, and equal their values on the real tokens alone; padding
    tokens are still routed and the outputs do not depend on the mask. Sites whose tokens are not
    the batch's positions (a decoding step with a cache) ignore it; so do encoder-decoder models.

    Attributes:
        model: the user's model (still a ``PreTrainedModel``; modules replaced in place).
        spec: the spec it was compiled from.
        plan: the :class:`~moleforge.compiler.Plan` it was compiled from.
        modules: ``{module name: AdaptedLinear or routed FFN block}``.
        graphs: ``{module name: optimised IR graph}`` (``plain_graphs``: before the passes).
        site_of: ``{module name: index in spec.sites}``.
    """

    def __init__(self, model: nn.Module, plan: Plan, modules: dict[str, nn.Module],
                 originals: dict[str, nn.Module], collector: AuxCollector, requires_grad: dict[str, bool]):
        self.model = model
        self.plan = plan
        """What was compiled: the sites, their graphs through the passes, the sibling groups."""
        self.spec = plan.spec
        self.modules = modules
        self.graphs = plan.graphs
        self.plain_graphs = plan.plain_graphs
        self.pipeline = plan.pipeline
        self.site_of = plan.site_of
        self._originals = originals
        self._collector = collector
        self._requires_grad = requires_grad
        self._hooks = [model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                       model.register_forward_hook(self._post_hook), *task_id_hooks(model, collector, plan.graphs)]
        self._last_aux: torch.Tensor | None = None
        self._share: torch.Tensor | None = None
        self._warned = False
        self._shifts_labels = _shifts_labels(model)
        self._mask_position = _attention_mask_position(model)
        self._own_save = _install_save_pretrained(model, self)
        _prepare_output_classes(model)
        self._stat_group: Any = WORLD
        self._ddp_ignored = _ignore_counts_in_ddp(model, self._counts_buffers())
        self.active = True

    # ---- training ----------------------------------------------------------------------
    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The adapter's trainable parameters (what an optimizer should get)."""
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, mod in self.modules.items():
            for pname, p in mod.site.named_parameters():
                if p.requires_grad:
                    yield f"{name}.{pname}", p

    def _counts_buffers(self) -> list[str]:
        """Model-level names of the balancing routers' selection-count buffers."""
        names = []
        for name in self.modules:
            for n in self.graphs[name].nodes:
                if isinstance(n, Route) and n.gate.balances:
                    names.append(f"{name}.site.{counts_name(n.gate.balance.name)}")
        return names

    def aux_loss(self) -> torch.Tensor | None:
        """The last forward's weighted aux loss (times ``spec.aux_loss_coef``), or ``None``."""
        return self._last_aux

    def _pre_hook(self, module, args, kwargs):
        """Start a forward: no aux terms yet; the call's padding mask (``attention_mask``, HF
        convention: 1 = real token) for the sites, so that aux losses, balancing counts and
        routing logs count the real tokens only."""
        self._collector.reset()
        self._collector.padding_mask = _padding_mask(args, kwargs, self._mask_position)
        self._share = _token_share(kwargs, self._shifts_labels)

    def _post_hook(self, module, args, output):
        """``loss += coef · aux`` (times the batch's share of ``num_items_in_batch``); ``aux_loss = coef · aux``.

        With ``num_items_in_batch`` (the HF Trainer under gradient accumulation) the model's loss is
        ``Σ_tokens ℓ / N`` over the whole accumulated batch, so each micro-batch's aux loss enters
        weighted by its share ``n / N`` of the counted label tokens: summed over the micro-batches
        this is the token-weighted mean of their aux losses, as without accumulation.
        """
        self._collector.padding_mask = None  # it belongs to this call only
        total = self._collector.total()
        if total is None:
            self._last_aux = None
            return output
        total = total * self.spec.aux_loss_coef
        self._last_aux = total
        if module.training and torch.is_grad_enabled() and not total.requires_grad and not self._warned:
            self._warned = True
            warnings.warn("the adapter's aux loss carries no gradient: the adapted layers ran without autograd in "
                          "this forward (activation checkpointing with use_reentrant=True does that); use "
                          "use_reentrant=False, the default of activation_checkpointing_enable()", stacklevel=2)
        loss = getattr(output, "loss", None)
        if loss is not None:
            weighted = total if self._share is None else total * self._share
            output["loss"] = loss + weighted.to(loss.dtype)
        return _output_with_aux(output, total)

    @contextmanager
    def sample_types(self, types: torch.Tensor):
        """Per-sample type labels ``(batch,)`` for localized balancing (LoRAMoE) during the block."""
        prev = self._collector.sample_types
        self._collector.sample_types = torch.as_tensor(types)
        try:
            yield
        finally:
            self._collector.sample_types = prev

    @contextmanager
    def record_routing(self):
        """Record every site's routing during the block; yields a :class:`RoutingLog`
        (``expert_load()``, ``entropy()``), of the real tokens only in padded batches."""
        log = RoutingLog()
        prev = self._collector.routing_log
        self._collector.routing_log = log.entries
        try:
            yield log
        finally:
            self._collector.routing_log = prev

    def update_balancing(self) -> None:
        """Apply the aux-loss-free balancing update of SMoRA / FlyLoRA routers from the
        selections counted (of real tokens, in padded batches) since the last call:
        ``b_j += rate · sign(mean(c) - c_j)``.
        Call after each optimizer step (the Trainer callback does).

        In a distributed run (``torch.distributed`` initialised, a statistics group of more than
        one rank: :meth:`set_statistics_group`) the counts are first summed over the ranks, in one
        all-reduce, so that every rank applies the update of the whole batch and the biases stay
        equal on every rank: call it on every rank of the group, at the same step."""
        entries = []
        for name, mod in self.modules.items():
            for n in self.graphs[name].nodes:
                if isinstance(n, Route) and n.gate.balances:
                    router = getattr(self.spec.sites[self.site_of[name]].adapter, "router", None)
                    entries.append((getattr(mod.site, n.gate.balance.name),
                                    getattr(mod.site, counts_name(n.gate.balance.name)),
                                    getattr(router, "bias_update_rate", 0.0)))
        if not entries:
            return
        with torch.no_grad():
            pg = group_of(self._stat_group)
            if pg is not None:
                counts = [c for _, c, _ in entries]
                total = all_sum_(torch.cat([c.reshape(-1).to(counts[0].device) for c in counts]), pg)
                for c, t in zip(counts, total.split([c.numel() for c in counts])):
                    c.copy_(t.view_as(c))
            for bias, counts, rate in entries:
                if counts.sum() > 0:
                    bias += rate * torch.sign(counts.mean() - counts)
                counts.zero_()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Run :meth:`update_balancing` after every ``optimizer.step()`` (a post-step hook on
        that optimizer only; removed by :meth:`remove`)."""
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: self.update_balancing()))

    def seed_noise(self, seed: int | None, *, rank: int | None = None) -> None:
        """Draw routing noise (noisy top-k gates, router input jitter) from a generator seeded
        with ``seed`` (``None``: torch's global generator).

        In a distributed run each rank seeds its generators with a seed derived from ``seed`` and
        its rank in the statistics group (:meth:`set_statistics_group`; ``rank`` overrides it):
        ranks draw different noise for their different tokens, rank 0 draws what a single
        process seeded with ``seed`` draws, and a run is reproducible for a given number of
        ranks. Ranks that share a rank in that group (the tensor-parallel ranks of one
        data-parallel replica) draw the same noise."""
        if seed is not None:
            seed = rank_seed(seed, rank_in(self._stat_group) if rank is None else rank)
        for mod in self.modules.values():
            held = next(itertools.chain(mod.site.parameters(), mod.site.buffers()), None)  # frozen sites: buffers
            dev = held.device if held is not None else torch.device("cpu")
            gen = None if seed is None else torch.Generator(device=dev).manual_seed(seed)
            mod.site.noise_generator = gen

    def set_statistics_group(self, group: Any = WORLD) -> None:
        """The ranks over which the aux losses sum their routing statistics and
        :meth:`update_balancing` its counts: ``"world"`` (the default: the default process group
        whenever ``torch.distributed`` is initialised with more than one rank), a
        ``ProcessGroup`` (the data-parallel group when tensor or pipeline parallelism splits
        the world), or ``None`` (each rank on its own statistics).

        With a group, the aux loss of a training forward is that of the tokens of every rank
        together, and its gradients, averaged over the ranks by DDP or FSDP, are those of one
        process on the concatenated batch (see ``moleforge/backends/runtime/dist.py``). Forwards
        in evaluation mode or without autograd use their own tokens only, so one rank can
        evaluate or generate alone."""
        self._stat_group = group
        for mod in self.modules.values():
            mod.site.stat_group = group

    @property
    def statistics_group(self) -> Any:
        """See :meth:`set_statistics_group`."""
        return self._stat_group

    # ---- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{module.param: tensor}`` of every declared tensor (trainable or buffer)."""
        out = {}
        for name, mod in self.modules.items():
            for decl in self.graphs[name].params:
                out[f"{name}.{decl.name}"] = getattr(mod.site, decl.name)
        return out

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (``{module.param: tensor}``) into the adapter.

        Raises:
            CheckpointError: a tensor's dtype is not one the adapter is saved in (see
                :func:`dtype_mismatches`); nothing is copied then.
        """
        own = self.state_dict()
        problems = dtype_mismatches(own, tensors)
        if problems:
            raise CheckpointError("the saved tensors do not have the adapter's dtypes:\n  - " + "\n  - ".join(problems))
        with torch.no_grad():
            for k, v in tensors.items():
                own[k].copy_(_like(own[k], v.to(own[k].dtype)))

    def explain(self, ir: str = "diff") -> str:
        """What the compiler built, per group of identical sites: adapter, parameters, FLOPs per
        token, kernel, siblings, Γ and the IR through the passes (see :func:`moleforge.explain`)."""
        return explain_plan(self.plan, ir=ir)  # type: ignore[arg-type]

    # ---- removal -------------------------------------------------------------------------
    def remove(self) -> nn.Module:
        """Put the original modules back and restore every ``requires_grad`` flag: the model is
        bit-for-bit the one ``compile`` received. Returns the model."""
        if not self.active:
            return self.model
        for name, orig in self._originals.items():
            parent, child = get_submodule_parent(self.model, name)
            setattr(parent, child, orig)
        for pname, p in self.model.named_parameters():
            if pname in self._requires_grad:
                p.requires_grad_(self._requires_grad[pname])
        for h in self._hooks:
            h.remove()
        if self._own_save and vars(self.model).get("save_pretrained") == self._save_pretrained:
            del self.model.save_pretrained
        _unignore_in_ddp(self.model, self._ddp_ignored)
        self.active = False
        return self.model

    def _save_pretrained(self, save_directory, *args, is_main_process: bool = True, state_dict=None,
                         **kwargs) -> None:
        """``model.save_pretrained`` while the adapter is injected (what ``Trainer.save_model`` calls):
        writes the moleforge adapter (``mf.save``), not the full state dict, as PEFT does for its
        models. Full merged weights: ``mf.export_merged``.

        Only the main process writes (``is_main_process``, which the Trainer sets on rank 0). Given
        the model's ``state_dict`` (the Trainer passes the gathered one under FSDP), the adapter's
        tensors are taken from it rather than from the (possibly sharded) modules."""
        if not is_main_process:
            return
        tensors = None
        if state_dict is not None:
            keys = {k: _model_key(k) for k in self.state_dict()}
            if all(key in state_dict for key in keys.values()):
                tensors = {k: state_dict[key] for k, key in keys.items()}
        save(self, save_directory, tensors=tensors, all_ranks=True)

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.trainable_parameters())
        return f"AdapterHandle({self.spec.name!r}, {len(self.modules)} sites, {n:,} trainable parameters)"
