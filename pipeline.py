"""The training step layer by layer from the host, on one pipeline stage or across several (1F1B).

A stage holds the layers layout.stage_of gives it (the first also the embedding, the last the final norm and
lm_head) and runs them as a few small compiled graphs, each compiled once whatever the depth: the embedding, one
decoder layer's forward, its backward (which recomputes the forward from the layer's saved input: only layer inputs
are kept between the two), the head with the loss, and the embedding's backward. The host loops over layers and
micro-batches. One stage (pipeline_stage 1) is the layer-by-layer step train.py uses on CPU from
train.layerwise_from layers, where MindSpore's compile time grows with every layer one graph unrolls.

Across stages each micro-batch's activations go forward and their gradients come back through comm.exchange: an
all-reduce over the two neighbours' own group, the sender contributing the tensor and the receiver zeros. MindSpore
2.10 has no point-to-point kernels on CPU (Send/Receive, comm_func.send), so this is what runs on every backend; one
with Send/Receive could put them behind the same function. The schedule is 1F1B (PipeDream-flush, as
Megatron-LM): warm-up forwards, then one forward and one backward in turn, then the remaining backwards, so stage k
keeps at most pipeline_stage - k micro-batches of layer inputs. A send that is followed by a receive from the same
neighbour is one exchange in both directions, which is what keeps blocking exchanges from deadlocking (tested by
simulating every stage's exchanges).

Gradients come out as token-weighted sums, exactly as train.py's one-graph step makes them, for train.py's `apply`.
"""
import functools

import numpy as np
import mindspore as ms

import layout
import llama
from comm import exchange


# ----------------------------------------------------------------------------------------------------------------------
# The schedule

def one_f_one_b(pp, stage, micro_batches):
    """This stage's compute order: [('F', m) or ('B', m)]."""
    warmup = min(pp - stage - 1, micro_batches)
    order = [('F', m) for m in range(warmup)]
    for i in range(micro_batches - warmup):
        order += [('F', warmup + i), ('B', i)]
    return order + [('B', m) for m in range(micro_batches - warmup, micro_batches)]


def events(pp, stage, micro_batches, backward=True):
    """The stage's computes and exchanges in order: ('F' | 'B', m) and ('exchange', side, act, grad), where side is
    'prev' or 'next' and act / grad the micro-batch whose activation (going up) or gradient (coming down) the
    exchange carries, or None. An exchange is the same event on both of its stages. backward=False: forwards only
    (evaluation)."""
    order = one_f_one_b(pp, stage, micro_batches) if backward else [('F', m) for m in range(micro_batches)]
    first, last = stage == 0, stage == pp - 1
    out, have = [], set()  # have: the ('act' | 'grad', m) this stage has received

    def needs(kind, m):
        return (kind == 'F' and not first and ('act', m) not in have) or \
            (kind == 'B' and not last and ('grad', m) not in have)
    for i, (kind, m) in enumerate(order):
        if needs(kind, m):  # a receive that could not ride along with a send
            out.append(('exchange', 'prev', m, None) if kind == 'F' else ('exchange', 'next', None, m))
            have.add(('act', m) if kind == 'F' else ('grad', m))
        out.append((kind, m))
        after = order[i + 1] if i + 1 < len(order) else None
        if kind == 'F' and not last:  # send the activation up, with the next backward's gradient if it is due
            grad = after[1] if after and after[0] == 'B' and needs(*after) else None
            out.append(('exchange', 'next', m, grad))
            if grad is not None:
                have.add(('grad', grad))
        if kind == 'B' and not first:  # send the gradient down, with the next forward's activation if it is due
            act = after[1] if after and after[0] == 'F' and needs(*after) else None
            out.append(('exchange', 'prev', act, m))
            if act is not None:
                have.add(('act', act))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The compiled pieces

@functools.cache
def pieces(args, lora_mode):
    """The jitted functions of one model; with LoRA the adapters train and the weights are frozen."""
    def embed(table, inputs):
        return llama.embed(table, inputs, args)

    def embed_dot(table, inputs, dh):
        return (embed(table, inputs).astype(ms.float32) * dh).sum()

    def layer_out(w, lora, h, seed):
        ctx = llama.sequence_context(h.shape[0], h.shape[1], args, seed)
        return llama.layer(w, h, args, ctx, lora)[0]

    def layer_dot(w, lora, h, seed, dh):
        """Its gradient is the layer's vector-Jacobian product with dh (MindSpore's vjp takes no dicts)."""
        return (layer_out(w, lora, h, seed).astype(ms.float32) * dh).sum()

    def head_loss(rest, h, inputs, targets, scale):
        loss, n_tokens = llama.token_loss(llama.head(rest, h, args), inputs, targets, args)
        return loss * scale, (loss, n_tokens)

    layer_vjp = ms.grad(layer_dot, grad_position=(1 if lora_mode else 0, 2))
    head_grad = ms.value_and_grad(head_loss, grad_position=1 if lora_mode else (0, 1), has_aux=True)

    @ms.jit
    def head_step(rest, h, inputs, targets, scale):
        (_, (loss, n_tokens)), grads = head_grad(rest, h, inputs, targets, scale)
        return (loss, n_tokens, None, grads) if lora_mode else (loss, n_tokens) + tuple(grads)

    @ms.jit
    def head_loss_sum(rest, h, inputs, targets):
        loss, n_tokens = llama.token_loss(llama.head(rest, h, args), inputs, targets, args)
        return loss * n_tokens, n_tokens

    @ms.jit
    def weigh(acc, grads, n_tokens):
        """Token-weighted sums over micro-batches, as the one-graph step keeps them."""
        return {k: g * n_tokens if acc is None else acc[k] + g * n_tokens for k, g in grads.items()}

    return {'embed': ms.jit(embed), 'embed_backward': ms.jit(ms.grad(embed_dot, grad_position=0)),
            'layer': ms.jit(layer_out), 'layer_backward': ms.jit(layer_vjp), 'head': head_step,
            'head_loss_sum': head_loss_sum, 'weigh': weigh}


# ----------------------------------------------------------------------------------------------------------------------
# One stage's step

def mutable(tree):
    return None if tree is None else ms.mutable(tree)


class Stage:
    """The layer-by-layer step of this process's pipeline stage over one optimizer step's micro-batches.

    params: (rest, layers) of the trainable tensors this stage holds (with LoRA: ({}, adapters)); frozen: with LoRA,
    the base weights' (rest, layers), else None; first: the index of the stage's first layer; seed: the step's
    dropout seed (None: evaluation, no dropout)."""

    def __init__(self, params, frozen, args, first, micro_batches, seed=None, loss_scale=None):
        self.lora_mode = frozen is not None
        self.f, self.args, self.first, self.loss_scale = pieces(args, self.lora_mode), args, first, loss_scale
        rest, self.layers = frozen if self.lora_mode else params
        self.table = {k: v for k, v in rest.items() if k == layout.EMBEDDING}  # the lookup's (first stage)
        tied = layout.LM_HEAD not in rest
        self.rest = {k: v for k, v in rest.items() if k != layout.EMBEDDING or tied}  # the head's (last stage)
        self.adapters = params[1] if self.lora_mode else [None] * len(self.layers)
        self.batches = [tuple(ms.Tensor(x) for x in shifted(b)) for b in micro_batches]
        self.n_tokens = [count_tokens(b, args) for b in micro_batches]
        dropout = seed is not None and self.lora_mode and args.lora_dropout > 0
        self.seeds = [ms.Tensor(seed * len(micro_batches) + m, ms.int32) if dropout else None
                      for m in range(len(micro_batches))]
        self.saved, self.dh = {}, {}  # per micro-batch: the layer inputs; the head's gradient (last stage)
        self.sums = [None] * (len(self.layers) + 1)  # token-weighted gradient sums: the rest, then each layer
        self.loss_sum = self.n_sum = ms.Tensor(0.0, ms.float32)

    def dropout_seed(self, m, i):
        return None if self.seeds[m] is None else llama.layer_seed(self.seeds[m], self.first + i, self.args.n_layers)

    def forward(self, m, h=None, last=True):
        """Micro-batch m through this stage's layers (h: the activation received, on every stage but the first);
        returns the output activation, or on the last stage runs the head and keeps its gradient."""
        inputs, targets = self.batches[m]
        if h is None:
            h = self.f['embed'](ms.mutable(self.table), inputs)
        self.saved[m] = []
        for i, w in enumerate(self.layers):
            self.saved[m].append(h)
            h = self.f['layer'](ms.mutable(w), mutable(self.adapters[i]), h, self.dropout_seed(m, i))
        if not last:
            return h
        loss, n_tokens, rest_grads, dh = self.f['head'](ms.mutable(self.rest), h, inputs, targets, self.loss_scale)
        if rest_grads is not None:
            self.accumulate(0, rest_grads, m)
        self.loss_sum, self.n_sum = self.loss_sum + loss * n_tokens, self.n_sum + n_tokens
        self.dh[m] = dh
        return None

    def backward(self, m, dh=None, first=True):
        """The gradient of micro-batch m back through this stage's layers (dh: the gradient received, on every stage
        but the last); returns the gradient of the stage's input, or on the first stage adds the embedding's."""
        dh = self.dh.pop(m) if dh is None else dh
        saved = self.saved.pop(m)
        for i in reversed(range(len(self.layers))):
            grads, dh = self.f['layer_backward'](ms.mutable(self.layers[i]), mutable(self.adapters[i]), saved[i],
                                                 self.dropout_seed(m, i), dh.astype(ms.float32))
            self.accumulate(i + 1, grads, m)
        if not first:
            return dh
        if not self.lora_mode:
            lookup = self.f['embed_backward'](ms.mutable(self.table), self.batches[m][0], dh.astype(ms.float32))
            self.accumulate(0, lookup, m)
        return None

    def accumulate(self, group, grads, m):
        """Add grads (of group 0, the rest, or of layer group - 1), weighted by micro-batch m's scored tokens."""
        total, n = self.sums[group], self.n_tokens[m]
        if total is not None and set(total) == set(grads):
            self.sums[group] = self.f['weigh'](ms.mutable(total), ms.mutable(grads), n)
            return
        weighted = self.f['weigh'](None, ms.mutable(grads), n)
        total = total or {}
        self.sums[group] = {**total, **{k: total[k] + g if k in total else g for k, g in weighted.items()}}


def shifted(batch):
    return llama.shift(*(np.asarray(x) for x in batch))


def count_tokens(batch, args):
    """The scored positions of a micro-batch (llama.token_loss's rule), counted on the host."""
    inputs, targets = shifted(batch)
    return ms.Tensor(float(np.sum((targets != args.ignore_id) & (inputs != args.pad_id))), ms.float32)


def activation_shape(batch, args):
    return batch[0].shape[0], batch[0].shape[1] - 1, args.dim


def grad_sums(params, frozen, micro_batches, seed, loss_scale, args, mesh):
    """Gradient sums of this stage's trainable tensors over the step's micro-batches, scheduled 1F1B across the
    pipeline: ((rest, layers) of token-weighted sums, loss sum, scored tokens). The loss sum and the token count are
    this stage's (zero but on the last)."""
    pp, stage = mesh.parallel.pipeline_stage, mesh.coords.stage
    first = layout.stage_layers(args.n_layers, mesh.parallel, stage)[0]
    step = Stage(params, frozen, args, first, micro_batches, seed, loss_scale)
    run(step, events(pp, stage, len(micro_batches)), mesh, activation_shape(micro_batches[0], args))
    layers = [s or {} for s in step.sums[1:]]
    rest = step.sums[0] or {}
    rest = {k: rest[k] for k in params[0] if k in rest}  # the params' order, as in the one-graph step (apply's norms)
    return (rest, layers), step.loss_sum, step.n_sum


def run(step, schedule, mesh, shape):
    """Carry out a stage's events: computes on `step`, exchanges with the neighbours."""
    first, last = mesh.coords.stage == 0, mesh.coords.stage == mesh.parallel.pipeline_stage - 1
    act_in, grad_in, act_out, grad_out = {}, {}, {}, {}
    for event in schedule:
        if event[0] == 'F':
            act_out[event[1]] = step.forward(event[1], act_in.pop(event[1], None), last)
        elif event[0] == 'B':
            grad_out[event[1]] = step.backward(event[1], grad_in.pop(event[1], None), first)
        else:
            _, side, act, grad = event
            upper = side == 'prev'
            sent_act = None if upper or act is None else act_out.pop(act)
            sent_grad = None if not upper or grad is None else grad_out.pop(grad)
            got_act, got_grad = exchange(mesh.prev if upper else mesh.next, upper, sent_act, sent_grad,
                                         (act is not None, grad is not None), shape)
            if upper and act is not None:
                act_in[act] = got_act.astype(getattr(ms, step.args.compute_dtype))
            if not upper and grad is not None:
                grad_in[grad] = got_grad


def evaluate(params, frozen, batches, args, mesh):
    """(loss sum, scored tokens) of batches through this stage's layers, forwards only, one batch at a time (zero but
    on the last stage, whose head scores them)."""
    pp, stage = mesh.parallel.pipeline_stage, mesh.coords.stage
    first = layout.stage_layers(args.n_layers, mesh.parallel, stage)[0]
    loss_sum = n_sum = ms.Tensor(0.0, ms.float32)
    for batch in batches:
        step = Stage(params, frozen, args, first, [batch])
        h = None
        if stage > 0:
            h = exchange(mesh.prev, True, shape=activation_shape(batch, args))[0].astype(getattr(ms, args.compute_dtype))
        h = step.forward(0, h, last=False)
        if stage < pp - 1:
            exchange(mesh.next, False, act=h)
            continue
        inputs, targets = step.batches[0]
        loss, n = step.f['head_loss_sum'](ms.mutable(step.rest), h, inputs, targets)
        loss_sum, n_sum = loss_sum + loss, n_sum + n
    return loss_sum, n_sum
