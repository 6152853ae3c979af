"""model.pretrained by name or URL: downloaded once into the cache, checked against the SHA-256 in
its name, and a clear message without network. A local HTTP server stands in for the hosts."""

import functools
import hashlib
import http.server
import os
import threading

import pytest

from pspnet_jax import pretrained
from pspnet_jax.errors import UserError


@pytest.fixture
def server(tmp_path):
  """Serves tmp_path/'served' on 127.0.0.1; yields (base URL, folder, request log)."""
  folder = tmp_path / 'served'
  folder.mkdir()
  requests = []

  class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      requests.append(self.path)

  httpd = http.server.ThreadingHTTPServer(
      ('127.0.0.1', 0), functools.partial(Handler, directory=str(folder)))
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}', folder, requests
  httpd.shutdown()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('PSPNET_JAX_CACHE', str(tmp_path / 'cache'))
  return tmp_path / 'cache'


def _publish(folder, stem, data):
  """The file as torch.hub and OpenMMLab name them: STEM-<sha256[:8]>.pth."""
  name = f'{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth'
  (folder / name).write_bytes(data)
  return name


def test_a_url_is_downloaded_once_and_checked(server, cache):
  base, folder, requests = server
  name = _publish(folder, 'resnet50', b'weights' * 1000)
  path = pretrained.resolve(f'{base}/{name}', 'torchvision-resnet')
  assert path == os.path.join(cache, name)
  assert open(path, 'rb').read() == b'weights' * 1000
  assert pretrained.resolve(f'{base}/{name}', 'torchvision-resnet') == path
  assert len(requests) == 1  # the second call used the cache


def test_a_file_whose_digest_differs_is_refused_and_not_cached(server, cache):
  base, folder, _ = server
  (folder / 'resnet50-deadbeef.pth').write_bytes(b'not the published file')
  with pytest.raises(UserError, match='SHA-256'):
    pretrained.resolve(f'{base}/resnet50-deadbeef.pth', 'torchvision-resnet')
  assert not cache.exists() or not os.listdir(cache)


def test_without_network_the_error_names_the_url_and_where_to_put_the_file(cache):
  # Port 9 (discard) on localhost refuses the connection.
  with pytest.raises(UserError) as error:
    pretrained.resolve('http://127.0.0.1:9/resnet50_v1c-2cccc1ad.pth', 'mmseg-resnet')
  assert 'http://127.0.0.1:9/resnet50_v1c-2cccc1ad.pth' in str(error.value)
  assert str(cache / 'resnet50_v1c-2cccc1ad.pth') in str(error.value)


def test_known_names_download_from_their_host_into_the_cache(server, cache, monkeypatch):
  base, folder, _ = server
  data = b'v1c' * 100
  name = _publish(folder, 'resnet50_v1c', data)
  monkeypatch.setitem(pretrained.KNOWN, 'mmseg:resnet50_v1c', pretrained.KnownWeights(
      f'{base}/{name}', name, 'mmseg-resnet'))
  assert open(pretrained.resolve('mmseg:resnet50_v1c', 'mmseg-resnet'), 'rb').read() == data


def test_known_names_fix_their_layout_and_say_which_flags_fit():
  with pytest.raises(UserError, match='pretrained_format=torchvision-resnet .*deep_stem=False'):
    pretrained.resolve('torchvision:resnet50', 'semseg-resnet')
  with pytest.raises(UserError, match='arch=mmseg'):
    pretrained.resolve('mmseg:resnet101_v1c', 'semseg-resnet')


def test_semsegs_backbones_name_the_manual_download(cache):
  with pytest.raises(UserError, match='Google Drive.*resnet101_v2.pth'):
    pretrained.resolve('semseg:resnet101_v2', 'semseg-resnet')
  (cache).mkdir()
  (cache / 'resnet101_v2.pth').write_bytes(b'x')
  assert pretrained.resolve('semseg:resnet101_v2', 'semseg-resnet') == str(
      cache / 'resnet101_v2.pth')


def test_paths_pass_through():
  assert pretrained.resolve('/data/resnet50.pth', 'semseg-resnet') == '/data/resnet50.pth'


def test_every_known_url_carries_its_digest_in_the_name():
  for name, known in pretrained.KNOWN.items():
    assert known.url is None or pretrained._DIGEST_IN_NAME.search(known.file_name), name
    assert known.url is None or known.url.endswith('/' + known.file_name), name
