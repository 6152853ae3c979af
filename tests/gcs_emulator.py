"""A local Google Cloud Storage for the tests: gcp-storage-emulator, reached by every client we use.

`start(folder)` runs this file as a subprocess (the emulator keeps its objects
in memory; a process of its own keeps its Python threads away from the GIL
of the process under test) and returns the environment that points each
client at it:

- tensorstore (orbax's array writes): `TENSORSTORE_GCS_HTTP_URL` (the
  endpoint) and `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a bearer token instead of
  Google credentials); both read by tensorstore's kvstore/gcs_http driver and
  oauth2 google_auth_provider.
- google-cloud-storage (orbax asks it whether a checkpoint bucket has a
  hierarchical namespace): `STORAGE_EMULATOR_HOST` (google/cloud/storage/
  _helpers.py), with anonymous credentials then (client.py).
- array_record's reader (Grain reading TFDS ArrayRecord files from gs://):
  google-cloud-cpp's storage client inside array_record_module.so reads
  `CLOUD_STORAGE_EMULATOR_ENDPOINT` (google/cloud/storage/client_options.cc)
  and then needs no credentials.
- TensorFlow's GCS filesystem (tf.io.gfile: etils.epath, TFDS, TensorBoard
  event files): it has no endpoint variable (tsl/platform/cloud/
  gcs_file_system.cc hard-codes https://www.googleapis.com and
  https://storage.googleapis.com). Its libcurl honours the standard proxy
  variables, so `HTTPS_PROXY` sends it to a proxy here that terminates TLS
  with a certificate made for those two names (`CURL_CA_BUNDLE`, read by
  tsl's curl_http_request.cc, trusts it) and passes the bytes on to the
  emulator. `http_proxy` is for the emulator's resumable-upload URLs, which
  say http://www.googleapis.com (it builds them from the Host header).
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` and `NO_GCE_CHECK` (tsl's
  google_auth_provider.cc) skip credentials and the metadata server.

Five emulator gaps that real GCS does not have are patched in the
subprocess:
- a body sent both chunked and with Content-Length is read by the length
  (TensorFlow's uploads send both; HTTP says chunked wins), and chunks are
  appended one by one (quadratic for a checkpoint-sized upload);
- an empty media upload (TensorFlow's directory marker `dir/`) fails with a
  TypeError;
- `Expect: 100-continue` gets no answer, which costs every upload curl's
  one-second wait;
- a download has no `x-goog-generation` header, which tensorstore's OCDBT
  (orbax's array format) needs for its manifest;
- a bucket has no `storageLayout` (TensorFlow asks for it before renaming a
  folder, and fails on the 404).
The emulator ignores generation preconditions (`ifGenerationMatch`): nothing
here can test writes that rely on them for exclusivity.
"""

import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

BUCKET = 'bucket'
# Where TensorFlow's GCS client sends its requests (the JSON API and the XML-API downloads).
GOOGLE_HOSTS = ('www.googleapis.com', 'storage.googleapis.com')


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


def _make_certificate(folder: str) -> tuple[str, str]:
  cert, key = os.path.join(folder, 'cert.pem'), os.path.join(folder, 'key.pem')
  names = ','.join(f'DNS:{host}' for host in GOOGLE_HOSTS)
  subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
                  '-subj', '/CN=gcs-emulator', '-addext', f'subjectAltName={names}',
                  '-keyout', key, '-out', cert], check=True, capture_output=True)
  return cert, key


def start(folder: str) -> tuple[subprocess.Popen, dict]:
  """Starts the emulator with bucket BUCKET; returns the process and the clients' environment."""
  cert, key = _make_certificate(folder)
  emulator_port, proxy_port = _free_port(), _free_port()
  process = subprocess.Popen([sys.executable, __file__, str(emulator_port), str(proxy_port), cert,
                              key], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  endpoint = f'http://127.0.0.1:{emulator_port}'
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(endpoint, timeout=1).close()
      with socket.create_connection(('127.0.0.1', proxy_port), timeout=1):
        break
    except OSError:
      if process.poll() is not None or time.time() > deadline:
        process.kill()
        raise RuntimeError('the GCS emulator did not start') from None
      time.sleep(0.1)
  proxy = f'http://127.0.0.1:{proxy_port}'
  return process, {
      'TENSORSTORE_GCS_HTTP_URL': endpoint, 'CLOUD_STORAGE_EMULATOR_ENDPOINT': endpoint,
      'STORAGE_EMULATOR_HOST': endpoint,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator',
      'NO_GCE_CHECK': 'true', 'HTTPS_PROXY': proxy, 'https_proxy': proxy, 'http_proxy': proxy,
      'CURL_CA_BUNDLE': cert, 'no_proxy': '127.0.0.1,localhost', 'NO_PROXY': '127.0.0.1,localhost'}


def _patch_emulator():
  """The five fixes named in the module docstring."""
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

  # pylint: disable=protected-access
  read_raw_data, read_data = server._read_raw_data, server._read_data

  def read_raw_chunked_first(handler):
    if handler.headers.get('Transfer-Encoding', '').lower() != 'chunked':
      return read_raw_data(handler)
    # Joined once: the emulator appends chunk by chunk, quadratic for a checkpoint-sized upload.
    chunks = []
    while size := int(handler.rfile.readline().strip() or b'0', 16):
      chunks.append(handler.rfile.read(size))
      handler.rfile.readline()
    return b''.join(chunks)

  def read_empty_media(handler, query):
    data = read_data(handler, query)
    return b'' if data is None and query.get('uploadType') == ['media'] else data

  parse_request = server.RequestHandler.parse_request

  def parse_and_continue(handler):
    parsed = parse_request(handler)
    if parsed and handler.headers.get('Expect', '').lower() == '100-continue':
      handler.send_response_only(100)
      handler.end_headers()
    return parsed

  def storage_layout(request, response, storage):
    del storage
    response.json({'kind': 'storage#storageLayout', 'bucket': request.params['bucket_name'],
                   'location': 'US', 'locationType': 'multi-region',
                   'hierarchicalNamespace': {'enabled': False}})

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    if response.status.value < 300:
      stored = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = stored['generation']
      response['x-goog-metageneration'] = stored['metageneration']

  server._read_raw_data, server._read_data = read_raw_chunked_first, read_empty_media
  server.RequestHandler.parse_request = parse_and_continue
  objects.download = download_with_generation   # objects.get calls it for alt=media
  server.HANDLERS = ((r'^/storage/v1/b/(?P<bucket_name>[-.\w]+)/storageLayout$',
                      {server.GET: storage_layout}),) + server.HANDLERS
  for _, methods in server.HANDLERS:
    for method, handler in methods.items():
      if handler is download:
        methods[method] = download_with_generation


def _pipe(source: socket.socket, sink: socket.socket) -> None:
  try:
    while data := source.recv(1 << 16):
      sink.sendall(data)
  except OSError:
    pass
  finally:
    for end in (source, sink):
      try:
        end.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass


def _proxy_connection(client: socket.socket, emulator: tuple, tls: ssl.SSLContext) -> None:
  """One proxied connection: a CONNECT tunnel (TLS ends here) or a plain http:// request."""
  head = b''
  while b'\r\n\r\n' not in head:
    if not (data := client.recv(1 << 16)):
      return
    head += data
  line, rest = head.split(b'\r\n', 1)
  method, target, version = line.split(b' ')
  if method == b'CONNECT':
    client.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
    client, rest = tls.wrap_socket(client, server_side=True), b''
  else:  # http://host/path -> /path, the form a server expects
    rest = b' '.join([method, b'/' + target.split(b'/', 3)[3], version]) + b'\r\n' + rest
  upstream = socket.create_connection(emulator)
  upstream.sendall(rest)
  threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
  _pipe(client, upstream)


def _serve(emulator_port: int, proxy_port: int, cert: str, key: str) -> None:
  from gcp_storage_emulator.server import create_server  # pylint: disable=import-outside-toplevel

  _patch_emulator()
  create_server('127.0.0.1', emulator_port, in_memory=True, default_bucket=BUCKET).start()
  tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  tls.load_cert_chain(cert, key)
  listener = socket.create_server(('127.0.0.1', proxy_port))
  while True:
    client, _ = listener.accept()
    threading.Thread(target=_proxy_connection, args=(client, ('127.0.0.1', emulator_port), tls),
                     daemon=True).start()


if __name__ == '__main__':
  _serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
