"""The HuggingFace ``Trainer`` callback of a compiled adapter: aux-loss and routing logs, and the
balancing-bias update once per optimizer step.

The Trainer itself needs nothing else: the compiled model stays the user's ``PreTrainedModel``,
its ``outputs.loss`` already holds ``spec.aux_loss_coef · aux`` (scaled for gradient accumulation
through ``num_items_in_batch``), and ``trainer.save_model`` writes the moleforge adapter. A
padding collator needs nothing either: the batch's ``attention_mask`` makes the aux losses, the
balancing counts and the routing statistics count the real tokens only. Two Trainer settings
compute the loss outside the model and so leave the aux loss out unless the user adds
``outputs["aux_loss"]``: ``compute_loss_func`` and ``label_smoothing_factor``. The
Trainer's ``resume_from_checkpoint`` reloads only weight files it knows (``model.safetensors``,
PEFT adapters); ``mf.MoleforgeTrainer`` resumes a moleforge checkpoint, bit-exactly.

On several processes (``torchrun``, ``accelerate launch``) the callback runs on every rank: the
aux losses already hold the whole batch's statistics (summed over the ranks in the forward), the
balancing update sums the ranks' counts before moving the biases, and ``trainer.save_model``
writes on the main process only. Call ``handle.seed_noise(seed)`` after building the Trainer (it
sets up ``torch.distributed``) to give each rank its own noise stream.

    handle = mf.compile("molora", model)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[mf.MoleforgeTrainerCallback(handle)])
    trainer.train()
"""

from __future__ import annotations

from contextlib import ExitStack

from transformers import TrainerCallback

from .handle import AdapterHandle
from .routing_log import RoutingLog
from .sites import layer_of

__all__ = ["MoleforgeTrainerCallback"]


class MoleforgeTrainerCallback(TrainerCallback):
    """Logs the adapter's aux loss and routing statistics; updates balancing biases.

    After every optimizer step it calls ``handle.update_balancing()`` (SMoRA / FlyLoRA biases
    move once per optimizer step, whatever the gradient accumulation). On the steps the Trainer
    logs, it records routing (``handle.record_routing()``) and adds to the logs:

    - ``aux_loss``: mean of ``coef · aux`` over the micro-batches since the last log;
    - ``routing/entropy``: mean entropy (nats) of the router probabilities over all sites;
    - ``routing/max_load``: mean over sites of ``E · max_i load_i`` (1 when balanced, E when one
      expert takes every token);
    - ``routing/layer_{i}/entropy`` and ``routing/layer_{i}/max_load`` per transformer layer.

    The values go into the ``logs`` passed to the callbacks after this one (the console printer)
    and into ``trainer.state.log_history``; ``history`` keeps every site's load vector and
    entropies per logged step, for plots.

    With this callback, do not also ``handle.attach(optimizer)``: the biases would move twice a step.

    Args:
        handle: the compiled adapter being trained.
        routing_stats: record routing on logged steps (costs one detached copy of each site's
            gates for the step's micro-batches).
    """

    def __init__(self, handle: AdapterHandle, *, routing_stats: bool = True):
        self.handle = handle
        self.routing_stats = routing_stats
        self.history: list[dict] = []
        self._stack: ExitStack | None = None
        self._log: RoutingLog | None = None
        self._aux: list[float] = []
        self._loads: dict[str, list] = {}
        self._entropy: dict[str, list[list[float]]] = {}

    # ---- Trainer events ----------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if self.routing_stats and _will_log(args, state):
            self._stack = ExitStack()
            self._log = self._stack.enter_context(self.handle.record_routing())

    def on_substep_end(self, args, state, control, **kwargs):
        self._take()

    def on_step_end(self, args, state, control, **kwargs):
        self._take()
        if self._stack is not None:
            self._stack.close()
            self._stack = self._log = None
        self.handle.update_balancing()

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = self._metrics(state.global_step)
        if not metrics:
            return
        if logs is not None:
            logs.update(metrics)
        if state.log_history:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self._stack is not None:
            self._stack.close()
            self._stack = self._log = None

    # ---- bookkeeping -------------------------------------------------------------------
    def _take(self) -> None:
        """Fold the last micro-batch's aux loss and routing into the running sums."""
        aux = self.handle.aux_loss()
        if aux is not None:
            self._aux.append(float(aux.detach()))
        if self._log is None or not self._log.entries:
            return
        for module, loads in self._log.expert_load().items():
            self._loads.setdefault(module, []).append([v.cpu() for v in loads])
        for module, ent in self._log.entropy().items():
            self._entropy.setdefault(module, []).append(ent)
        self._log.entries.clear()

    def _metrics(self, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._aux:
            out["aux_loss"] = sum(self._aux) / len(self._aux)
        if self._loads:
            load = {m: [sum(col) / len(col) for col in zip(*rows)] for m, rows in self._loads.items()}
            ent = {m: [sum(col) / len(col) for col in zip(*rows)] for m, rows in self._entropy.items()}
            self.history.append({"step": step, "expert_load": {m: [v.tolist() for v in vs] for m, vs in load.items()},
                                 "entropy": ent})
            out.update(_summaries(load, ent))
        self._aux, self._loads, self._entropy = [], {}, {}
        return out


def _will_log(args, state) -> bool:
    """Whether the Trainer logs after the step about to run (``global_step + 1``)."""
    step = state.global_step + 1
    if str(getattr(args, "logging_strategy", "steps")).endswith("steps"):
        every = args.logging_steps
        every = max(1, int(every * state.max_steps)) if isinstance(every, float) and every < 1 else int(every)
        return step % every == 0 or (bool(args.logging_first_step) and step == 1)
    return True


def _summaries(load: dict[str, list], ent: dict[str, list[float]]) -> dict[str, float]:
    per_site = {}
    for module, vs in load.items():
        max_load = sum(float(v.max()) * v.numel() for v in vs) / len(vs)
        entropy = sum(ent.get(module, [0.0])) / max(1, len(ent.get(module, [])))
        per_site[module] = (entropy, max_load)
    out = {"routing/entropy": _mean([e for e, _ in per_site.values()]),
           "routing/max_load": _mean([m for _, m in per_site.values()])}
    layers: dict[str, list[tuple[float, float]]] = {}
    for module, v in per_site.items():
        layer = layer_of(module)
        layers.setdefault("other" if layer is None else str(layer), []).append(v)
    for layer, vs in sorted(layers.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)):
        out[f"routing/layer_{layer}/entropy"] = _mean([e for e, _ in vs])
        out[f"routing/layer_{layer}/max_load"] = _mean([m for _, m in vs])
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
