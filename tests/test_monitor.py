"""What a run shows: MindFormers' loss lines read, TensorBoard's framing, the tensor a non-finite gradient is traced to.
The pictures and event files of real runs are checked in test_train.py, on the runs it trains anyway."""
import functools
import glob
import json
import math
import os
import struct

import mindspore as ms
import numpy as np
import pytest

import layout
import llama
import monitor
import optim
import train
from configs import tiny
from conftest import ROOT, setup_of

MINDFORMERS_LOG = os.path.join(ROOT, 'tests', 'fixtures', 'mindformers_train.log')


def test_mindformers_loss_lines_are_read():
    """The fixture's 12 steps over 2 epochs of 6: steps count on across epochs, the mean is MindFormers' own, the
    overflow at step 3 is a skipped step, and lines that are not loss lines are ignored."""
    head, *records = monitor.read_mindformers(MINDFORMERS_LOG)
    assert head['total_steps'] == 12 and [r['step'] for r in records] == list(range(1, 13))
    assert (records[0]['loss'], records[0]['loss_mean'], records[0]['lr'], records[0]['loss_scale']) == \
        (10.142, 10.142, 7.5e-05, 65536.0)
    assert (records[6]['step'], records[6]['loss'], records[6]['loss_mean']) == (7, 8.268, 8.268)  # epoch 2 restarts
    assert [r['skipped_steps'] for r in records if r['skipped']] == [[3]] and records[2]['loss_scale'] == 32768.0


def test_later_mindformers_line_format(tmp_path):
    """From 2024 the line opens with '{', the loss is one number (in sink mode) and the global norm follows."""
    path = tmp_path / 'new.log'
    path.write_text('2024-05-01 10:00:00,000 - mindformers[mindformers/core/callback/callback.py:331] - INFO - '
                    '{ Epoch:[  3/  5], step:[   10/  100], loss: 2.125, per_step_time: 812ms, lr: 1e-05, '
                    'overflow cond: False, loss_scale: 1.0, global_norm: [0.7734375], train_throughput_per_npu: 1.2T\n')
    (record,) = monitor.read_mindformers(str(path))[1:]
    assert record == {'step': 210, 'loss': 2.125, 'losses': [2.125], 'lr': 1e-05, 'loss_scale': 1.0,
                      'grad_norm': 0.7734375, 'skipped': 0, 'skipped_steps': []}


def crc32c(data):
    """CRC-32C bit by bit (no table), checked below against the standard's check value."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@functools.cache
def event_message_class():
    """TensorFlow's Event / Summary / Summary.Value, only the fields TensorBoard's scalars use (event.proto:
    wall_time 1, step 2, file_version 3, summary 5; summary.proto: value 1; Value: tag 1, simple_value 2),
    declared here and decoded by the protobuf library, not by our writer's code."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name='tb_event_check.proto', package='check', syntax='proto3')
    messages = {'Value': [('tag', 1, F.TYPE_STRING, None), ('simple_value', 2, F.TYPE_FLOAT, None)],
                'Summary': [('value', 1, F.TYPE_MESSAGE, '.check.Value')],
                'Event': [('wall_time', 1, F.TYPE_DOUBLE, None), ('step', 2, F.TYPE_INT64, None),
                          ('file_version', 3, F.TYPE_STRING, None), ('summary', 5, F.TYPE_MESSAGE, '.check.Summary')]}
    for name, fields in messages.items():
        message = f.message_type.add(name=name)
        for field, number, kind, type_name in fields:
            message.field.add(name=field, number=number, type=kind, type_name=type_name,
                              label=F.LABEL_REPEATED if field == 'value' else F.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(f.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName('check.Event'))


def masked(crc):
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(directory):
    """(file_version, {tag: {step: value}}) of the one event file in directory, every record's checksums verified."""
    (path,) = glob.glob(os.path.join(directory, 'events.out.tfevents.*'))
    data, at, events = open(path, 'rb').read(), 0, []
    while at < len(data):
        length = data[at:at + 8]
        (n,) = struct.unpack('<Q', length)
        assert struct.unpack('<I', data[at + 8:at + 12])[0] == masked(crc32c(length))
        payload = data[at + 12:at + 12 + n]
        assert struct.unpack('<I', data[at + 12 + n:at + 16 + n])[0] == masked(crc32c(payload))
        events.append(event_message_class().FromString(payload))
        at += 16 + n
    scalars = {}
    for event in events[1:]:
        for value in event.summary.value:
            scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return events[0].file_version, scalars


def test_crc32c_check_value():
    assert crc32c(b'123456789') == 0xE3069283  # RFC 3720's CRC-32C check value
    assert masked(crc32c(b'\x00' * 8)) == monitor.masked_crc(b'\x00' * 8)


def test_injected_non_finite_gradient_is_named(tmp_path):
    """An infinite gradient in layer 1's w2 only: the stop message names that tensor and its layer, the step and the
    last good checkpoint (none yet)."""
    setup = setup_of()
    params = llama.split_layers(llama.init_params(setup.args, 0), setup.args.n_layers)
    grads = ({k: ms.Tensor(np.full(v.shape, 0.5, np.float32)) for k, v in params[0].items()},
             [{k: ms.Tensor(np.full(v.shape, 0.5, np.float32)) for k, v in g.items()} for g in params[1]])
    w2 = np.full(params[1][1]['feed_forward.w2.weight'].shape, 0.5, np.float32)
    w2[3, 5] = np.inf
    grads[1][1]['feed_forward.w2.weight'] = ms.Tensor(w2)
    zero, one = ms.Tensor(0.0), ms.Tensor(1.0)
    pieces = optim.apply_pieces(setup.opt, setup.mesh, setup.plan, compiled=True)
    state, metrics = optim.apply(optim.init_state(params), grads, zero, one, zero, ms.Tensor(1e-3), pieces)
    norms = metrics['grad_norms'].asnumpy()
    names = monitor.tensor_names(state)
    assert [names[i] for i in np.flatnonzero(~np.isfinite(norms))] == ['model.layers.1.feed_forward.w2.weight']
    cfg = tiny.get_config()
    cfg.train.update(out_dir=str(tmp_path), peak_tflops=1.0)
    log = monitor.Log(cfg, setup, 10, 1024)
    log.add(metrics)
    with pytest.raises(train.RunError) as e:
        log.step(1, 1e-3, state)
    log.close()
    assert 'at step 1; the first non-finite gradient (in backward order) is model.layers.1.feed_forward.w2.weight ' \
           '(layer 1): lower the learning rate' in str(e.value)
    assert str(e.value).endswith('no checkpoint was written yet')
    finite = np.sqrt(0.5 ** 2 * np.prod(params[0][layout.NORM_OUT].shape))  # a tensor of 0.5s, per scored token
    assert norms[names.index(layout.NORM_OUT)] == pytest.approx(finite)
    assert not math.isfinite(float(metrics['grad_norm'].asnumpy()))


def test_a_resumed_run_replaces_what_it_repeats(tmp_path):
    """A run logged to step 8 and resumed from its checkpoint at step 6 logs 7 and 8 again: readers keep the
    resumed ones."""
    path = tmp_path / 'log.jsonl'
    lines = [{'config': {}, 'start_step': 0}] + [{'step': s, 'loss': 1.0} for s in range(1, 9)] + \
        [{'config': {}, 'start_step': 6}] + [{'step': s, 'loss': 2.0} for s in (7, 8)]
    path.write_text(''.join(json.dumps(r) + '\n' for r in lines) + '{"step": 9, "lo')  # the last line cut by a kill
    records = monitor.read_log(str(path))
    assert [(r.get('step'), r.get('loss')) for r in records] == \
        [(None, None)] + [(s, 1.0) for s in range(1, 7)] + [(None, None), (7, 2.0), (8, 2.0)]
