"""What a run shows of itself: a log line per log_interval steps and eval, the same records as JSON in
out_dir/log.jsonl (after a header with the config), a picture of the curves in out_dir/curves.png, optionally
TensorBoard events; tokens/s, MFU and peak memory; the tensor where a gradient first went non-finite.

    python train.py --plot out/a out/b mindformers.log --out compare.png   # overlay runs' curves

The picture is drawn with Pillow, which MindSpore itself installs: every install has it, including offline clusters,
and a redraw takes ~50 ms on CPU (matplotlib measured 0.3-0.7 s per redraw plus 0.7-1.7 s to import on this
2-core machine). TensorBoard's event file is written here too (TFRecord framing, two protobuf messages): ~80 lines
instead of a dependency.
"""
import functools
import hashlib
import json
import math
import os
import re
import resource
import socket
import struct
import sys
import time

import numpy as np
import mindspore as ms

import layout
import llama
import util
from convert import newest_checkpoint  # the last good checkpoint a stopped run names
from util import RunError

LOG, PICTURE = 'log.jsonl', 'curves.png'


# ----------------------------------------------------------------------------------------------------------------------
# The run's log

class Log:
    """The run's records: a line every log_interval steps and at each eval, printed by the first process, kept in
    `records` and appended to out_dir/log.jsonl as JSON (after a header record); the picture and the TensorBoard
    events follow each record. A step's metrics stay device tensors until its window is logged, so logging reads
    nothing between log lines and the step never waits for the host."""

    def __init__(self, cfg, setup, total_steps, tokens_per_step, start_step=0):
        t = cfg.train
        self.cfg, self.total_steps, self.tokens_per_step, self.main = cfg, total_steps, tokens_per_step, \
            setup.mesh.rank == 0
        self.world, self.flops = setup.mesh.world, layout.flops_per_token(setup.args, layout.seq_length(cfg))
        self.peak = t.peak_tflops * 1e12 or measured_matmul_flops()
        self.first_layer = (layout.stage_layers(setup.args.n_layers, setup.mesh.parallel, setup.mesh.coords.stage)
                            or [0])[0]
        self.records, self.window, self.steps, self.start = [], [], 0, time.time()
        self.file = self.picture = self.events = None
        if self.main:
            path = os.path.join(t.out_dir, LOG)
            try:
                earlier = read_log(path) if os.path.isfile(path) else []  # (not a device or a pipe)
            except RunError as e:  # a damaged log does not stop a run: its picture starts here
                earlier = []
                self.say(f'note: {e}; the picture starts from this run')
            head = header(cfg, setup, total_steps, tokens_per_step, start_step)
            self.file = start_log(path, head)
            self.picture = Picture(os.path.join(t.out_dir, PICTURE), run_label(t.out_dir), earlier + [head])
            self.events = Events(t.out_dir) if t.tensorboard else None
            self.say(f'curves: {self.picture.path}'
                     + (f', TensorBoard events: {self.events.path}' if self.events else ''))

    def say(self, line):
        if self.main:
            print(line)

    def append(self, record):
        if self.file:
            self.file.write(json.dumps(record) + '\n')
            self.file.flush()

    def write(self, record):
        self.records.append(record)
        self.append(record)
        if self.events:
            self.events.write(record)
        if self.picture:
            self.picture.update(self.records)

    def add(self, metrics):
        """A step's metrics (tensors), read when its window is logged."""
        self.window.append(metrics)
        self.steps += 1

    def step(self, done, lr, state):
        """Log the steps up to done; a non-finite loss or gradient without loss scaling stops the run, before
        anything non-finite is saved, naming the step, the tensor whose gradient was first non-finite, and the
        last good checkpoint."""
        t, window = self.cfg.train, self.window
        losses = [float(m['loss'].asnumpy()) for m in window]
        norms = [float(m['grad_norm'].asnumpy()) for m in window]
        first = done - len(window) + 1
        bad = [i for i in range(len(window)) if not (math.isfinite(losses[i]) and math.isfinite(norms[i]))]
        if bad and not t.loss_scale:
            i = bad[0]
            good = newest_checkpoint(t.out_dir)
            raise RunError(f'loss {losses[i]}, gradient norm {norms[i]} at step {first + i}'
                           f'{culprit(tensor_names(state, self.first_layer), window[i]["grad_norms"].asnumpy())}: '
                           f'lower the learning rate or use loss scaling; '
                           + (f'the last good checkpoint is {good}' if good else 'no checkpoint was written yet'))
        elapsed = time.time() - self.start
        tokens_per_s = self.steps * self.tokens_per_step / elapsed
        finite = [x for x in losses if math.isfinite(x)]
        skipped = [first + i for i in bad]  # with loss scaling a non-finite gradient skips its step
        rss, device = peak_memory()
        record = {'step': done, 'loss': losses[-1], 'loss_mean': sum(finite) / len(finite) if finite else math.nan,
                  'losses': losses, 'lr': lr, 'grad_norm': norms[-1], 'tokens_per_s': tokens_per_s,
                  'mfu': tokens_per_s * self.flops / self.peak / self.world,
                  'eta_s': (self.total_steps - done) * elapsed / self.steps,
                  'loss_scale': float(state['counters'][1].asnumpy()), 'skipped': len(skipped),
                  'skipped_steps': skipped, 'peak_rss_mib': rss, **({'peak_device_mib': device} if device else {})}
        if t.log_grad_norms:
            record['grad_norms'] = layer_norms(tensor_names(state, self.first_layer),
                                               window[-1]['grad_norms'].asnumpy())
        self.say(f"step {done}/{self.total_steps} loss {record['loss']:.4f} (mean {record['loss_mean']:.4f}) "
                 f"lr {lr:.2e} grad_norm {record['grad_norm']:.3f} {tokens_per_s:,.0f} tok/s "
                 f"MFU {100 * record['mfu']:.1f}% ETA {record['eta_s']:.0f}s peak RSS {rss:,.0f} MiB"
                 + (f' device {device:,.0f} MiB' if device else '')
                 + (f" loss_scale {record['loss_scale']:g} skipped {len(skipped)}" if t.loss_scale else ''))
        self.write(record)
        self.window = []
        self.restart()

    def eval(self, done, loss):
        self.say(f'step {done} eval loss {loss:.4f} perplexity {math.exp(loss):.2f}')
        self.write({'step': done, 'eval_loss': loss, 'perplexity': math.exp(loss)})
        self.restart()

    def restart(self):
        """Time from here: what came between (evals, saves) is not the steps' time."""
        self.steps, self.start = 0, time.time()

    def close(self):
        """The last picture (also when the run stops on an error), then the files."""
        if self.picture:
            self.picture.update(self.records, final=True)
        if self.events:
            self.events.close()
        if self.file:
            self.file.close()


def start_log(path, head):
    """log.jsonl open for appending, the run's header written and flushed: or, where it cannot be written (a full
    disk, no permission), one line, and no empty log left behind."""
    new = not os.path.exists(path)
    try:
        f = open(path, 'a')
        try:
            f.write(json.dumps(head) + '\n')
            f.flush()
        except OSError:
            f.close()
            raise
    except OSError as e:
        if new:
            util.remove_path(path)
        raise RunError(f'cannot write {path} ({e.strerror}): free some space in train.out_dir, or choose another') \
            from e
    return f


def header(cfg, setup, total_steps, tokens_per_step, start_step):
    """The first record of a run (and of each resumed part): what it is, so a log describes itself."""
    args = setup.args
    lora = layout.adapter_shapes(cfg, args)
    return {'config': cfg.to_dict(), 'parameters': layout.count_params(args),
            'trainable_parameters': sum(math.prod(s) for s in lora.values()) if lora else layout.count_params(args),
            'start_step': start_step, 'total_steps': total_steps, 'tokens_per_step': tokens_per_step,
            'processes': setup.mesh.world, 'device': ms.get_context('device_target'), 'mindspore': ms.__version__,
            'started': time.strftime('%Y-%m-%dT%H:%M:%S%z')}


def peak_memory():
    """(peak host RSS of this process, peak device memory or 0 where the backend reports none, as on CPU) in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == 'darwin' else 2 ** 10), ms.runtime.max_memory_allocated() / 2 ** 20


# ----------------------------------------------------------------------------------------------------------------------
# Gradients by tensor: optim.apply returns each tensor's gradient norm ('grad_norms'), in this order

def tensor_names(state, first_layer=0):
    """The names of this process's trainable tensors in the order of optim.apply's 'grad_norms': the rest
    (embedding, final norm, lm_head), then each layer's."""
    return list(llama.join_layers(*state['params'], first_layer))


def backward_order(names):
    """Indices of names in the order the backward pass computes their gradients: lm_head, the final norm, the
    layers from the last, the embedding. A non-finite value spreads from where it appears to every gradient computed
    after it, so the first non-finite one in this order is where it started."""
    def position(name):
        match = layout.LAYER.fullmatch(name)
        return (2, -int(match.group(1))) if match else ({layout.LM_HEAD: 0, layout.NORM_OUT: 1}.get(name, 3), 0)
    return sorted(range(len(names)), key=lambda i: position(names[i]))  # stable: a layer keeps its own order


def culprit(names, norms):
    """', the first non-finite gradient ... is <name> (layer i)' for a stop message, or '' when all are finite."""
    for i in backward_order(names):
        if not math.isfinite(norms[i]):
            match = layout.LAYER.fullmatch(names[i])
            where = f'layer {match.group(1)}' if match else \
                'before the layers' if names[i] == layout.EMBEDDING else 'after the layers'
            return f'; the first non-finite gradient (in backward order) is {names[i]} ({where})'
    return ''


def layer_norms(names, norms):
    """{'model.layers.<i>': the norm of the layer's gradients, or a tensor outside the layers: its norm}."""
    squares = {}
    for name, norm in zip(names, norms):
        match = layout.LAYER.fullmatch(name)
        key = f'model.layers.{match.group(1)}' if match else name
        squares[key] = squares.get(key, 0.0) + float(norm) ** 2
    return {k: math.sqrt(v) for k, v in squares.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Reading runs: our log.jsonl, or a MindFormers training log

MAX_LINE_BYTES = 1 << 20  # a longer log line is garbage (a record of ours is ~1 KB, a MindFormers loss line ~300 B)
MAX_STEP = 1 << 53  # steps are whole numbers below this: the picture's axis, a float, holds them exactly


def log_lines(path):
    """A log's lines, streamed: memory holds one line whatever the file (a 500 MB file read whole took 4.7 GB).
    Bytes that are not UTF-8 (a line a kill cut short) read as U+FFFD; a line longer than MAX_LINE_BYTES (a binary
    file) is None, its bytes skipped. A file larger than util.MAX_TEXT_BYTES is not a log: refused, not scanned."""
    with util.opened(path, RunError) as f:
        if os.fstat(f.fileno()).st_size > util.MAX_TEXT_BYTES:
            raise RunError(f'{path} is larger than {util.MAX_TEXT_BYTES >> 20:,} MB: is it the right file?')
        while raw := f.readline(MAX_LINE_BYTES + 1):
            if len(raw) <= MAX_LINE_BYTES or raw.endswith(b'\n'):
                yield from raw.decode('utf-8', 'replace').splitlines()  # a \r or \u2028 ends a line too, as ever
                continue
            yield None
            while raw and not raw.endswith(b'\n'):
                raw = f.readline(MAX_LINE_BYTES)


def read_log(path):
    """The records of a log.jsonl, their values checked (log_record). A header whose start_step is s (a resumed
    run) drops what earlier parts logged after s, which the resumed run repeats; a last line cut short by a kill is
    ignored."""
    records, cut = [], None
    for n, line in enumerate(log_lines(path), 1):
        if cut:
            raise RunError(f'{path}: line {cut} is not JSON (a {LOG} holds one JSON record per line)')
        if line is None:
            raise RunError(f'{path}: line {n} is longer than {MAX_LINE_BYTES:,} bytes: not a record of a {LOG}')
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than Python parses
            cut = n
            continue
        record = log_record(path, n, record)
        if 'config' in record:
            records = [r for r in records if r.get('step', 0) <= record.get('start_step', 0)]
        records.append(record)
    return records


def is_step(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_STEP


def is_number(value):
    """A JSON number a float holds (json reads 1e400 as inf, but 10**400 as an int float() refuses)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def list_of(kind):
    return lambda value: isinstance(value, list) and all(map(kind, value))


VALUES = {**dict.fromkeys(('loss', 'loss_mean', 'eval_loss', 'perplexity', 'lr', 'grad_norm', 'loss_scale',
                           'tokens_per_s', 'mfu', 'parameters'), is_number),
          'total_steps': is_step, 'losses': list_of(is_number), 'skipped_steps': list_of(is_step)}


def log_record(path, n, record):
    """Line n's record without the values the picture reads that are not of their kind (VALUES: a damaged or
    hand-edited log's "losses": 5 stopped the drawing with a TypeError), or RunError for a line that is neither a
    header nor a record with a step, or a header whose start_step is not a step."""
    if not isinstance(record, dict) or not ('config' in record or is_step(record.get('step'))):
        raise RunError(f'{path}: line {n} is neither a header nor a record with a step (a whole number from 0 to '
                       f'2^53)')
    if not is_step(record.get('start_step', 0)):
        raise RunError(f'{path}: line {n}: start_step {record["start_step"]!r:.40} is not a step (a whole number '
                       f'from 0 to 2^53)')
    return {key: value for key, value in record.items() if key not in VALUES or VALUES[key](value)}


MINDFORMERS_LINE = re.compile(  # MFLossMonitor's, 2023 ('loss:[x/mean], time:') and later ('loss: x, per_step_time:');
    # a number of more than 16 digits is no count of epochs or steps (and int() refuses one of over 4,300)
    r'Epoch:\[\s*(?P<epoch>\d{1,16})/\s*(?P<epochs>\d{1,16})\],'
    r'\s*step:\[\s*(?P<step>\d{1,16})/\s*(?P<steps>\d{1,16})\],'
    r'\s*loss:\s*\[?\s*(?P<loss>[-+\w.]+)(?:/\s*(?P<mean>[-+\w.]+)\])?(?P<rest>.*)')
MINDFORMERS_FIELDS = {'lr': r'\blr:\s*\[?\s*([-+\w.]+)', 'loss_scale': r'loss_scale:\s*\[?\s*([-+\w.]+)',
                      'grad_norm': r'global_norm:\s*\[?\s*([-+\w.]+)'}


def read_mindformers(path):
    """Records from the loss lines MindFormers' MFLossMonitor prints ('Epoch:[e/E], step:[s/S], loss:[x/mean],
    ..., lr:..., overflow cond: ..., loss_scale: ...'); steps count from 1 across epochs, a line whose step is not
    one (is_step) is skipped. Its mean is over the epoch so far, as it prints it; an overflow marks the step
    skipped."""
    records, total = [], 0
    for line in log_lines(path):
        m = MINDFORMERS_LINE.search(line or '')
        if not m or number(m['loss']) is None:
            continue
        steps = int(m['steps'])
        step = (int(m['epoch']) - 1) * steps + int(m['step'])
        if not is_step(step):
            continue
        total = int(m['epochs']) * steps
        record = {'step': step, 'loss': number(m['loss']), 'losses': [number(m['loss'])]}
        if number(m['mean']) is not None:
            record['loss_mean'] = number(m['mean'])
        for key, pattern in MINDFORMERS_FIELDS.items():
            value = re.search(pattern, m['rest'])
            if value and number(value[1]) is not None:
                record[key] = number(value[1])
        overflow = 'overflow cond: True' in m['rest']
        record.update(skipped=int(overflow), skipped_steps=[step] if overflow else [])
        records.append(record)
    return [{'config': {}, 'source': 'MindFormers', 'total_steps': total}] + records if records else []


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):  # 'unavailable', 'None', absent
        return None


def read_run(path):
    """(label, records) of a run given as its out_dir, its log.jsonl, or a MindFormers log."""
    file = os.path.join(path, LOG) if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise RunError(f'{path}: no such file or directory' if file == path else f'{path} holds no {LOG}')
    first = next((line for line in log_lines(file) if line is None or line.strip()), None)
    records = (read_log if first and first.lstrip().startswith('{') else read_mindformers)(file)
    if not any('loss' in r or 'eval_loss' in r for r in records):
        raise RunError(f'{file}: no training records (expected a {LOG} or a MindFormers log with its loss lines)')
    return run_label(path), records


def run_label(path):
    path = os.path.normpath(path)
    if os.path.basename(path) == LOG:
        path = os.path.dirname(path) or '.'
    return os.path.splitext(os.path.basename(os.path.abspath(path)))[0]


def plot_command(argv):
    """python train.py --plot RUN [RUN...] [--out PNG]: the runs' curves overlaid in one picture."""
    parser = util.ArgumentParser(prog='train.py --plot', description='Overlay runs\' curves in one picture.')
    parser.add_argument('--plot', nargs='+', required=True, metavar='RUN',
                        help=f'an out_dir, its {LOG}, or a MindFormers training log')
    parser.add_argument('--out', default='compare.png', help='the picture to write (default: compare.png)')
    options = parser.parse_args(argv)
    runs = [read_run(path) for path in options.plot]
    labels = [label for label, _ in runs]
    runs = [(path if labels.count(label) > 1 else label, records)
            for path, (label, records) in zip(options.plot, runs)]
    draw(runs, options.out)
    print(f'wrote {options.out}: ' + ', '.join(f'{label} ({sum("loss" in r for r in records)} logged steps)'
                                               for label, records in runs))


# ----------------------------------------------------------------------------------------------------------------------
# The picture

class Picture:
    """out_dir/curves.png, redrawn from the run's records at each log and eval, unless the last drawing is younger
    than 20 times what it took (so drawing costs under 5% even of a run that logs every step), and at the end."""

    def __init__(self, path, label, earlier):
        self.path, self.label, self.earlier = path, label, earlier
        self.drawn_at, self.cost, self.drawn, self.failed = 0.0, 0.0, 0, False

    def update(self, records, final=False):
        if self.failed or len(records) == self.drawn or (not final and time.time() - self.drawn_at < 20 * self.cost):
            return
        start = time.time()
        try:
            draw([(self.label, self.earlier + records)], self.path)
        except (OSError, util.ConvertError) as e:  # a picture never stops a run
            self.failed = True
            print(f'note: cannot write {self.path} ({e}); the run continues without it')
            return
        self.drawn_at, self.cost, self.drawn = time.time(), time.time() - start, len(records)


SIZE, COLUMNS, ROWS, TOP = (1260, 780), 3, 2, 44
MARGIN = (64, 30, 52, 40)  # left, top, right, bottom of a panel's plot area within its cell
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
SKIPPED = (214, 39, 40)
PANELS = (  # title, y scale, the curves (key, style), what the right axis shows
    ('train loss', 'linear', (('losses', 'raw'), ('loss_mean', 'mean')), None),
    ('eval loss (right: perplexity)', 'linear', (('eval_loss', 'points'),), 'perplexity'),
    ('learning rate', 'linear', (('lr', 'line'),), None),
    ('gradient norm', 'log10', (('grad_norm', 'line'),), None),
    ('loss scale', 'log2', (('loss_scale', 'line'), ('skipped', 'marks')), None),
    ('tokens/s (right: MFU)', 'linear', (('tokens_per_s', 'line'),), 'mfu'),
)
LEGENDS = {'raw': 'each step', 'mean': 'mean over the log window', 'marks': 'skipped step (overflow)'}


def curves(records):
    """{key: (steps, values)} of the records' curves; 'losses' holds each step's loss, 'skipped' the skipped steps,
    'mfu_per_token_s' MFU over tokens/s (constant in a run)."""
    c = {}

    def add(key, step, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            c.setdefault(key, ([], []))
            c[key][0].append(step)
            c[key][1].append(float(value))
    for r in records:
        if 'config' in r:
            continue
        for i, loss in enumerate(r.get('losses', [])):
            add('losses', r['step'] - len(r['losses']) + 1 + i, loss)
        for key in ('loss_mean', 'eval_loss', 'lr', 'grad_norm', 'loss_scale', 'tokens_per_s'):
            add(key, r['step'], r.get(key))
        for s in r.get('skipped_steps', []):
            add('skipped', s, 0.0)
        if r.get('tokens_per_s') and 'mfu' in r:
            c['mfu_per_token_s'] = r['mfu'] / r['tokens_per_s']
    return c


@functools.cache
def font(size):
    from PIL import ImageFont
    return ImageFont.load_default(size=size)


def draw(runs, path):
    """runs: [(label, records)] -> the picture, written to a hidden name beside path, then renamed over it."""
    from PIL import Image, ImageDraw, PngImagePlugin
    image = Image.new('RGB', SIZE, 'white')
    d = ImageDraw.Draw(image)
    data = [curves(records) for _, records in runs]
    steps = [s for c in data for key in ('losses', 'eval_loss', 'loss_mean') for s in c.get(key, ([], []))[0]]
    first = min(steps, default=0)
    x_range = (first, max(steps + [first + 1]))  # the steps logged (the title says how many the run plans)
    draw_title(d, runs)
    width, height = SIZE[0] // COLUMNS, (SIZE[1] - TOP) // ROWS
    for i, panel in enumerate(PANELS):
        x0, y0 = (i % COLUMNS) * width, TOP + (i // COLUMNS) * height
        box = (x0 + MARGIN[0], y0 + MARGIN[1], x0 + width - MARGIN[2], y0 + height - MARGIN[3])
        draw_panel(d, box, panel, data, x_range)
    info = PngImagePlugin.PngInfo()
    last = [r['step'] for _, records in runs for r in records if 'step' in r]
    info.add_text('last_step', str(max(last, default=0)))
    info.add_text('records', str(sum(len(records) for _, records in runs)))
    with util.atomic(path) as tmp:
        image.save(tmp, format='PNG', pnginfo=info)


def draw_title(d, runs):
    """One run: its name, size and progress; several: a colour key of the runs."""
    if len(runs) == 1:
        label, records = runs[0]
        head = next((r for r in reversed(records) if 'config' in r), {})
        done = max((r['step'] for r in records if 'step' in r), default=0)
        text = label + (f", {head['parameters']:,} parameters" if head.get('parameters') else '') + f', step {done}' \
            + (f"/{head['total_steps']}" if head.get('total_steps') else '')
        d.text((SIZE[0] // 2, TOP // 2), text, fill='black', font=font(17), anchor='mm')
        return
    x = 20
    for i, (label, _) in enumerate(runs):
        color = PALETTE[i % len(PALETTE)]
        d.rectangle((x, TOP // 2 - 6, x + 24, TOP // 2 + 6), fill=color)
        d.text((x + 30, TOP // 2), label, fill='black', font=font(15), anchor='lm')
        x += 50 + int(font(15).getlength(label))


def draw_panel(d, box, panel, data, x_range):
    title, scale, keys, right = panel
    left, top, right_px, bottom = box
    d.text(((left + right_px) // 2, top - 16), title, fill='black', font=font(14), anchor='mm')
    d.rectangle(box, outline=(90, 90, 90))
    lines = [(i, style, c[key]) for i, c in enumerate(data) for key, style in keys if key in c]
    values = [to_axis(v, scale) for _, _, (_, ys) in lines for v in ys]
    values = [v for v in values if v is not None]
    if not values:
        d.text(((left + right_px) // 2, (top + bottom) // 2), 'not logged', fill=(120, 120, 120), font=font(13),
               anchor='mm')
        return
    lo, hi, ticks = y_axis(min(values), max(values), scale)

    def px(step, value):
        return (left + (step - x_range[0]) / max(x_range[1] - x_range[0], 1) * (right_px - left),
                bottom - (value - lo) / (hi - lo) * (bottom - top))
    draw_ticks(d, box, ticks, scale, x_range, px, right_labels(right, ticks, data))
    for i, style, (xs, ys) in lines:
        if style == 'marks':  # along the bottom edge, red for one run, else in the run's colour
            for x in xs:
                cross(d, px(x, lo)[0], bottom - 7, SKIPPED if len(data) == 1 else PALETTE[i % len(PALETTE)])
        else:
            draw_curve(d, [(x, to_axis(y, scale)) for x, y in zip(xs, ys)], px, PALETTE[i % len(PALETTE)], style)
    if scale == 'log2' and {y for _, style, (_, ys) in lines if style == 'line' for y in ys} == {1.0}:
        d.text((right_px - 8, top + 8), 'no loss scaling', fill=(120, 120, 120), font=font(12), anchor='ra')
    for n, style in enumerate(dict.fromkeys(s for _, s, _ in lines if s in LEGENDS)):
        y = top + 12 + 16 * n
        if style == 'marks':
            cross(d, right_px - 140, y, SKIPPED)
        else:
            d.line((right_px - 150, y, right_px - 130, y), fill=(60, 60, 60), width=3 if style == 'mean' else 1)
        d.text((right_px - 125, y), LEGENDS[style], fill='black', font=font(12), anchor='lm')


def cross(d, x, y, color):
    d.line((x - 3, y - 3, x + 3, y + 3), fill=color, width=2)
    d.line((x - 3, y + 3, x + 3, y - 3), fill=color, width=2)


DRAWN = (1e-300, 1e300)  # the magnitudes drawn (and 0): an axis of others over- or underflows floats (±1e308 each
# side of one axis: its range is inf; a tick 10.0 ** 309); no loss, rate or norm is near them


def to_axis(value, scale):
    """A value in the axis' coordinate (log scales: the exponent), or None where it cannot be drawn."""
    if not (value == 0 or DRAWN[0] <= abs(value) <= DRAWN[1]) or (scale != 'linear' and value <= 0):
        return None
    return value if scale == 'linear' else math.log10(value) if scale == 'log10' else math.log2(value)


def y_axis(lo, hi, scale):
    """(low, high, ticks) of an axis holding [lo, hi]: round numbers; on log scales whole powers."""
    if scale != 'linear':
        lo, hi = math.floor(lo), max(math.ceil(hi), math.floor(lo) + 1)
        every = math.ceil((hi - lo + 1) / 6)
        return lo, hi, list(range(lo, hi + 1, every))
    pad = (hi - lo) * 0.05 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    return lo, hi, nice_ticks(lo, hi)


def nice_ticks(lo, hi, count=5):
    """About count round values (1, 2, 2.5 or 5 times a power of ten apart) within [lo, hi]."""
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step)
    return [k * step for k in range(first, int(math.floor(hi / step)) + 1)]


def label(value, scale='linear', digits=4):
    if scale == 'log2':
        return f'2^{value}'
    if scale == 'log10':
        value = 10.0 ** value
    if abs(value) >= 1e6:
        return f'{value / 1e6:.3g}M'
    if abs(value) >= 1e4:
        return f'{value / 1e3:.3g}k'
    return f'{value:.{digits}g}'


def right_labels(right, ticks, data):
    """The right axis' labels at the ticks: the perplexity of an eval loss, or the MFU of tokens/s when every run
    drawn has one ratio between the two (runs on other machines or models do not)."""
    if right == 'perplexity':  # e^710 is more than a float holds
        return [label(math.exp(t), digits=3) if t < 700 else f'e^{t:.3g}' for t in ticks]
    ratios = [c['mfu_per_token_s'] for c in data if 'mfu_per_token_s' in c]
    if right == 'mfu' and ratios and all(abs(r - ratios[0]) <= 1e-6 * ratios[0] for r in ratios):
        return [f'{100 * t * ratios[0]:.3g}%' for t in ticks]
    return None


def draw_ticks(d, box, ticks, scale, x_range, px, right):
    left, top, right_px, bottom = box
    for n, t in enumerate(ticks):
        _, y = px(x_range[0], t)
        if top - 1 <= y <= bottom + 1:
            d.line((left + 1, y, right_px - 1, y), fill=(228, 228, 228))
            d.text((left - 6, y), label(t, scale), fill='black', font=font(12), anchor='rm')
            if right:
                d.text((right_px + 6, y), right[n], fill=(90, 90, 90), font=font(12), anchor='lm')
    for t in nice_ticks(*x_range, count=4):
        x, _ = px(t, 0)
        if left - 1 <= x <= right_px + 1:
            d.line((x, bottom, x, bottom + 4), fill=(90, 90, 90))
            d.text((x, bottom + 6), f'{t:g}', fill='black', font=font(12), anchor='ma')
    d.text((right_px, bottom + 22), 'step', fill=(90, 90, 90), font=font(12), anchor='ra')


def draw_curve(d, points, px, color, style):
    """A run's curve: connected through finite values, broken where one is missing; raw steps in a light shade."""
    shade = tuple(int(c + (255 - c) * 0.6) for c in color) if style == 'raw' else color
    segment = []
    for x, y in points + [(None, None)]:
        if y is not None:
            segment.append(px(x, y))
            continue
        if len(segment) > 1:
            d.line(segment, fill=shade, width=3 if style == 'mean' else 1 if style == 'raw' else 2, joint='curve')
        if style == 'points' or len(segment) == 1:
            for cx, cy in segment:
                d.ellipse((cx - 3, cy - 3, cx + 3, cy + 3), fill=shade)
        segment = []


# ----------------------------------------------------------------------------------------------------------------------
# TensorBoard: an event file of scalar summaries, as TensorFlow writes it

class Events:
    """out_dir/events.out.tfevents.<time>.<host>: TFRecords (length, masked crc32c of it, data, masked crc32c of it)
    of Event messages (wall_time 1, step 2, file_version 3, summary 5) whose Summary holds Values (tag 1,
    simple_value 2): what `tensorboard --logdir out_dir` reads."""

    def __init__(self, directory):
        self.path = os.path.join(directory, f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}')
        self.file = open(self.path, 'ab')
        self.record(field(1, 1, time.time()) + field(3, 2, b'brain.Event:2'))

    def write(self, record):
        for step, values in scalars(record).items():
            summary = b''.join(field(1, 2, field(1, 2, tag.encode()) + field(2, 5, v)) for tag, v in values.items())
            self.record(field(1, 1, time.time()) + field(2, 0, step) + field(5, 2, summary))
        self.file.flush()

    def record(self, data):
        length = struct.pack('<Q', len(data))
        self.file.write(length + struct.pack('<I', masked_crc(length)) + data + struct.pack('<I', masked_crc(data)))

    def close(self):
        self.file.close()


def scalars(record):
    """{step: {tag: value}} of a log record: each step's loss at its own step, the rest at the record's."""
    out = {}
    if 'eval_loss' in record:
        out[record['step']] = {'eval/loss': record['eval_loss'], 'eval/perplexity': record['perplexity']}
        return out
    for i, loss in enumerate(record['losses']):
        out[record['step'] - len(record['losses']) + 1 + i] = {'train/loss': loss}
    out[record['step']].update({f'train/{k}': record[k] for k in ('loss_mean', 'lr', 'grad_norm', 'loss_scale',
                                                                  'skipped', 'tokens_per_s', 'mfu')})
    out[record['step']].update({f'memory/{k}': record[k] for k in ('peak_rss_mib', 'peak_device_mib') if k in record})
    out[record['step']].update({f'grad_norm/{k}': v for k, v in record.get('grad_norms', {}).items()})
    return out


def field(number, wire, value):
    """One protobuf field: wire type 0 varint, 1 double, 2 bytes, 5 float."""
    key = util.varint(number << 3 | wire)
    if wire == 0:
        return key + util.varint(value)
    if wire == 1:
        return key + struct.pack('<d', value)
    if wire == 5:
        return key + struct.pack('<f', value)
    return key + util.varint(len(value)) + value


@functools.cache
def crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # CRC-32C (Castagnoli), reflected
        table.append(c)
    return table


def masked_crc(data):
    """TFRecord's checksum: crc32c, rotated right by 15 bits plus a constant (so a crc of crcs is not a crc)."""
    table, c = crc_table(), 0xFFFFFFFF
    for byte in data:
        c = table[(c ^ byte) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------------------------------------------------

def matmul_timer(n, chained=10):
    """A timer of fp32 matmul throughput through MindSpore (bench.py's and the MFU's): each call runs `chained`
    n^3 matmuls in one compiled graph, so the ~0.3 ms a call costs is shared, and returns their FLOP/s."""
    a = ms.Tensor(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32) / np.sqrt(n))  # stays ~1

    @ms.jit
    def chain(x, y):
        for _ in range(chained):
            x = ms.ops.matmul(x, y)
        return x
    chain(a, a).asnumpy()

    def rate():
        start = time.perf_counter()
        chain(a, a).asnumpy()
        return 2 * chained * n ** 3 / (time.perf_counter() - start)
    return rate


@functools.cache
def measured_matmul_flops(n=1024, repeats=5):
    """This machine's fp32 matmul throughput (FLOP/s), the median of `repeats` timings: the peak MFU is measured
    against on CPU (once per process)."""
    rate = matmul_timer(n)
    return float(np.median([rate() for _ in range(repeats)]))


def digest(state):
    """sha256 of every trainable tensor's bytes: equal on all data-parallel ranks when they stay in sync."""
    digest = hashlib.sha256()
    rest, layers = state['params']
    for group in [rest] + layers:
        for k in sorted(group):
            digest.update(group[k].asnumpy().tobytes())
    return digest.hexdigest()

