"""One device mesh for the whole job, and the moves between host batches and global arrays.

Every device of every process sits on one `data` axis. Parameters, optimizer
state and BatchNorm statistics are replicated; batches are split along their
first dimension. Because the model then sees one global batch, BatchNorm with
no `axis_name` reduces over all devices: synchronized BatchNorm comes from the
sharding, not from a special layer.
"""

import collections
import itertools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all devices of all processes).

  Auto axis types keep the jit-with-shardings (pjit) behaviour; jax 0.10's
  make_mesh would otherwise default to Explicit sharding types.
  """
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """This process's share of a global batch; raises unless it splits evenly over the devices."""
  devices = mesh.devices.size
  if global_batch_size % devices:
    raise ValueError(f'batch size {global_batch_size} does not split over {devices} devices; '
                     f'use a multiple of {devices}')
  return global_batch_size // jax.process_count()


def to_global(host_batch: dict, mesh: Mesh) -> dict:
  """This process's rows of a batch (numpy) -> global arrays sharded over `data`.

  Every process passes its own rows; together they form the global batch in
  process order.
  """
  sharding = batch_sharded(mesh)
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(value))
          for name, value in host_batch.items()}


def prefetch_to_mesh(host_batches, mesh: Mesh, size: int):
  """The host batches of `host_batches` as global arrays (`to_global`), sent `size` ahead.

  When a batch is yielded, the next `size` batches have been sent too, so a
  batch's transfer overlaps the steps dispatched before it instead of
  delaying its own (transfers are asynchronous on accelerators).
  """
  queue = collections.deque()

  def send(count):
    for host_batch in itertools.islice(host_batches, count):
      queue.append(to_global(host_batch, mesh))

  send(size)
  while queue:
    batch = queue.popleft()
    send(1)
    yield batch


def replicate(tree, mesh: Mesh):
  """Places a pytree of arrays (the same on every process) on every device of the mesh.

  Not jax.device_put: with several processes it refuses a sharding over
  devices this process cannot address.
  """
  return multihost_utils.host_local_array_to_global_array(tree, mesh, PartitionSpec())


def with_sharding(abstract_tree, sharding_):
  """A tree of shapes (jax.ShapeDtypeStruct or arrays) -> the same shapes placed by `sharding_`.

  The restore target of a checkpoint and the out_shardings of an
  initialization describe the same state this way.
  """
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_),
                      abstract_tree)
