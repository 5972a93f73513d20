"""The pipeline schedule: the order in which a stage runs its micro-batches' forwards and backwards, and its
exchanges with the neighbouring stages.

A stage holds the layers layout.stage_of gives it (the first also the embedding, the last the final norm and
lm_head); step.py's layer-by-layer driver computes them (step.Stage), and `run` carries out a stage's events on it.
One stage (pipeline_stage 1) is the same driver without exchanges.

Across stages each micro-batch's activations go forward and their gradients come back through comm.exchange: an
all-reduce over the two neighbours' own group, the sender contributing the tensor and the receiver zeros. MindSpore
2.10 has no point-to-point kernels on CPU (Send/Receive, comm_func.send), so this is what runs on every backend; one
with Send/Receive could put them behind the same function. The schedule is 1F1B (PipeDream-flush, as
Megatron-LM): warm-up forwards, then one forward and one backward in turn, then the remaining backwards, so stage k
keeps at most pipeline_stage - k micro-batches of layer inputs. A send that is followed by a receive from the same
neighbour is one exchange in both directions, which is what keeps blocking exchanges from deadlocking (tested by
simulating every stage's exchanges).
"""
import mindspore as ms

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
# Carrying it out

def run(stage, schedule, mesh, shape):
    """Carry out a stage's events (of `events`): computes on `stage` (its forward(m, h, last) and backward(m, dh,
    first)), exchanges of activations of `shape` with the neighbours."""
    first, last = mesh.coords.stage == 0, mesh.coords.stage == mesh.parallel.pipeline_stage - 1
    act_in, grad_in, act_out, grad_out = {}, {}, {}, {}
    for event in schedule:
        if event[0] == 'F':
            act_out[event[1]] = stage.forward(event[1], act_in.pop(event[1], None), last)
        elif event[0] == 'B':
            grad_out[event[1]] = stage.backward(event[1], grad_in.pop(event[1], None), first)
        else:
            _, side, act, grad = event
            upper = side == 'prev'
            sent_act = None if upper or act is None else act_out.pop(act)
            sent_grad = None if not upper or grad is None else grad_out.pop(grad)
            got_act, got_grad = exchange(mesh.prev if upper else mesh.next, upper, sent_act, sent_grad,
                                         (act is not None, grad is not None), shape)
            if upper and act is not None:
                act_in[act] = got_act.astype(getattr(ms, stage.args.compute_dtype))
            if not upper and grad is not None:
                grad_in[grad] = got_grad
