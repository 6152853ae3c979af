"""ImageNet backbones by name: `model.pretrained` as a known name, a URL or a path.

  --config.model.pretrained=torchvision:resnet50     torchvision's ImageNet ResNet-50
  --config.model.pretrained=mmseg:resnet50_v1c       open-mmlab://resnet50_v1c (arch=mmseg)
  --config.model.pretrained=semseg:resnet50_v2       semseg's initmodel (manual download)
  --config.model.pretrained=https://host/file.pth    any URL
  --config.model.pretrained=/path/to/file.pth        a local (or gs://) file, as before

A name or URL is downloaded once into the cache (`$PSPNET_JAX_CACHE`, default
`~/.cache/pspnet_jax`) and its SHA-256 checked before it is used: every known
file's name carries the first 8 hex digits of its SHA-256 (the convention of
torch.hub and of OpenMMLab's `publish_model`), and so may any URL. A download
is written to a temporary file and renamed only once checked, so the cache
never holds a partial or wrong file. Without network, the error names the
URL and the cache path to put the file at by hand. semseg's backbones are on
Google Drive only (no stable URL): their name says where to get them.

Each known name also fixes the file's layout (`model.pretrained_format`), which
must be the config's: a mismatch fails with the flags that fix it.
"""

import dataclasses
import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request

from pspnet_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class KnownWeights:
  url: str | None      # None: no stable URL, downloaded by hand (`manual`)
  file_name: str
  format: str          # a weights.PRETRAINED_FORMATS layout
  manual: str = ''     # where to get a file without a URL


def _torchvision(depth: int, digest: str) -> KnownWeights:
  name = f'resnet{depth}-{digest}.pth'
  return KnownWeights(f'https://download.pytorch.org/models/{name}', name, 'torchvision-resnet')


def _mmseg(depth: int, digest: str) -> KnownWeights:
  name = f'resnet{depth}_v1c-{digest}.pth'
  return KnownWeights(f'https://download.openmmlab.com/pretrain/third_party/{name}', name,
                      'mmseg-resnet')


def _semseg(depth: int) -> KnownWeights:
  name = f'resnet{depth}_v2.pth'
  return KnownWeights(None, name, 'semseg-resnet', manual=(
      f'semseg\'s README links its ImageNet backbones ("initmodel") on Google Drive; '
      f'download {name} from there'))


KNOWN = {
    # torchvision's IMAGENET1K_V1 ResNets (7x7 stem: model.deep_stem=False).
    'torchvision:resnet18': _torchvision(18, 'f37072fd'),
    'torchvision:resnet34': _torchvision(34, 'b627a593'),
    'torchvision:resnet50': _torchvision(50, '0676ba61'),
    'torchvision:resnet101': _torchvision(101, '63fe2227'),
    'torchvision:resnet152': _torchvision(152, '394f9c45'),
    # OpenMMLab's ResNetV1c (deep stem 32-32-64), what mmseg's PSPNet configs start from.
    'mmseg:resnet18_v1c': _mmseg(18, 'b5776b93'),
    'mmseg:resnet50_v1c': _mmseg(50, '2cccc1ad'),
    'mmseg:resnet101_v1c': _mmseg(101, 'e67eebb6'),
    # semseg's deep-stem backbones, what the official PSPNet results start from.
    'semseg:resnet50_v2': _semseg(50),
    'semseg:resnet101_v2': _semseg(101),
}
# The torch.hub / publish_model convention: NAME-<first 8 hex digits of the SHA-256>.EXT
_DIGEST_IN_NAME = re.compile(r'-([0-9a-f]{8,64})\.[a-z]+$')


def cache_dir() -> str:
  return os.environ.get('PSPNET_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'pspnet_jax')


def _is_url(value: str) -> bool:
  return value.startswith(('https://', 'http://'))


def is_reference(value: str) -> bool:
  """True when `value` is a known name or a URL (something `resolve` downloads)."""
  return value in KNOWN or _is_url(value)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as file:
    for chunk in iter(lambda: file.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _download(url: str, target: str, expected_digest: str | None) -> None:
  """`url` -> `target`, through a temporary file beside it that must match the digest prefix."""
  directory = os.path.dirname(target)
  os.makedirs(directory, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=directory, prefix='.download-')
  try:
    with os.fdopen(handle, 'wb') as file, urllib.request.urlopen(url, timeout=60) as response:
      shutil.copyfileobj(response, file)
    if expected_digest is not None:
      actual = _sha256(temporary)
      if not actual.startswith(expected_digest):
        raise UserError(f'{url}: the download\'s SHA-256 is {actual[:16]}..., expected '
                        f'{expected_digest}...: not the published file (kept nothing)')
    os.replace(temporary, target)
  except (urllib.error.URLError, OSError) as error:
    raise UserError(f'could not download {url} ({getattr(error, "reason", error)}); without '
                    f'network, download it by hand to {target} or give '
                    '--config.model.pretrained=/path/to/the/file') from error
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def resolve(value: str, pretrained_format: str) -> str:
  """The local path of `model.pretrained` = `value` (a known name, a URL or a path), downloaded
  into the cache when needed; a path is returned as it is."""
  if not is_reference(value):
    return value
  if value in KNOWN:
    known = KNOWN[value]
    if known.format != pretrained_format:
      stem = ('--config.model.deep_stem=False' if known.format == 'torchvision-resnet' else
              '--config.model.deep_stem=True')
      variant = ' (or the config variant arch=mmseg)' if known.format == 'mmseg-resnet' else ''
      raise UserError(f'config.model.pretrained={value} holds a {known.format} backbone but '
                      f'config.model.pretrained_format={pretrained_format!r}: give '
                      f'--config.model.pretrained_format={known.format} {stem}{variant}')
    url, file_name = known.url, known.file_name
  else:
    url, file_name = value, os.path.basename(value.split('?')[0])
  target = os.path.join(cache_dir(), file_name)
  if os.path.isfile(target):
    return target
  if url is None:
    raise UserError(f'config.model.pretrained={value}: {KNOWN[value].manual} and put it at '
                    f'{target}, or give --config.model.pretrained=/path/to/{file_name}')
  match = _DIGEST_IN_NAME.search(file_name)
  _download(url, target, match.group(1) if match else None)
  return target
