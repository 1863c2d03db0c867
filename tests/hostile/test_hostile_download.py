"""The downloader under attack (issue 14): the private-address guard (IPv6 literals and
embedded IPv4, DNS failure, DNS rebinding, redirects), slow-drip and huge responses,
pixel bombs in formats the header check used to skip, and URLs browsers would encode.

Transfers and formats run through the real stage on Ray (``download``). The guard needs
a public address to succeed on, so those cases run the stage's own shard task
(``download_shard``) in this process, on a fake internet: a resolver that maps a few
``.example`` names to public addresses and a ``connect`` that sends those to the local
server, recording every address a socket was asked to reach.
"""

from __future__ import annotations

import glob
import io
import ipaddress
import socket
import tarfile
import time
import tracemalloc

import pandas as pd
import pytest
from PIL import Image

from mmloom.curate.config import load_config
from mmloom.testkit.demo_data import other_format, pixel_bomb
from mmloom.curate.download import download, download_shard
from mmloom.curate.ingest import ingest
from mmloom.testkit.localserver import LocalServer, Route
from mmloom.manifests.store import config_hash

MiB = 2**20
PUBLIC = "93.184.215.14"  # stands for a host on the internet; connections to it reach the local server
PUBLIC6 = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"


# ---------------------------------------------------------------------------- helpers


def statuses(root) -> pd.DataFrame:
    files = sorted(glob.glob(f"{root}/images/*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True).set_index("url")


def tar_images(root) -> dict[str, bytes]:
    out = {}
    for t in sorted(glob.glob(f"{root}/images/*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    out[m.name[:-4]] = tf.extractfile(m).read()
    return out


def ingest_urls(tmp_path, urls, **cfg_over):
    src = str(tmp_path / "meta.parquet")
    pd.DataFrame({  # LAION's schema, every row passing the prefilters
        "URL": urls, "TEXT": [f"caption {i}" for i in range(len(urls))], "WIDTH": 512, "HEIGHT": 512,
        "similarity": 0.35, "punsafe": 0.01, "pwatermark": 0.01,
    }).to_parquet(src, index=False)
    cfg = load_config(None, {"ingest.shard_size": 1000, **cfg_over})  # one shard: every case shares it
    root = str(tmp_path / "ds")
    ingest([src], root, cfg, progress=False)
    return root, cfg


def assert_intact(df, good: dict[str, tuple[int, int]], root) -> None:
    """Every good url is a success whose tar image decodes, at the source's original size."""
    tar = tar_images(root)
    for url, (w, h) in good.items():
        row = df.loc[url]
        assert row.status == "success", (url, row.error_message)
        assert (row.original_width, row.original_height) == (w, h)
        with Image.open(io.BytesIO(tar[row.key])) as im:
            assert im.size == (row.width, row.height)
            im.load()
    assert sorted(tar) == sorted(df[df.status == "success"].key)


def wait_ended(srv: LocalServer, path: str, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        reqs = srv.requests(path)
        if reqs and all(r.end is not None for r in reqs):
            return reqs
        time.sleep(0.05)
    raise AssertionError(f"the server is still sending {path}")


@pytest.fixture()
def good_server(images):
    with LocalServer({}) as srv:
        good = {}
        for name, data, _c, w, h in images[:3]:
            srv.add(f"/img/{name}", Route(data))
            good[f"/img/{name}"] = (w, h)
        yield srv, good


# ------------------------------------------------------- transfers and URLs, on Ray

DEADLINE = 2.0


def test_slow_drip_huge_bodies_and_urls_a_browser_would_encode(tmp_path, ray_local, good_server, images):
    srv, good_paths = good_server
    jpeg = images[3][1]
    good = {srv.url(p): wh for p, wh in good_paths.items()}
    w3, h3 = images[3][3], images[3][4]
    # a body that takes 20 s at a byte every 0.5 s: each read is quick, the whole is not
    srv.add("/drip.jpg", Route(jpeg[:40], drip=0.5))
    srv.add("/huge-length.jpg", Route(stream_bytes=2**31))  # announces 2 GiB
    srv.add("/huge-chunked.jpg", Route(stream_bytes=2**31, chunked=True))  # no length, never ends
    # browsers percent-encode these; the stored url stays as written
    srv.add("/with%20space/a%20b.jpg", Route(jpeg))
    srv.add("/%C3%BCber/b%C3%BCcher.jpg", Route(jpeg))
    srv.add("/query.jpg", Route(jpeg))
    srv.add("/kept%2Fescape.jpg", Route(jpeg))  # an existing %XX is not encoded twice
    srv.add("/redirected", Route(redirect_to="/with space/a b.jpg"))
    bad = {
        srv.url("/drip.jpg"): ("failed_to_download", f"deadline of {DEADLINE:g} s"),
        srv.url("/huge-length.jpg"): ("failed_to_download", f"Content-Length 2147483648 is above max_body_bytes {MiB}"),
        srv.url("/huge-chunked.jpg"): ("failed_to_download", f"body is above max_body_bytes {MiB}"),
        srv.url("/x.jpg\r\nX-Injected: yes"): ("failed_to_download", "control character"),
        srv.url("/nul\x00.jpg"): ("failed_to_download", "control character"),
    }
    encoded = {
        srv.url("/with space/a b.jpg"): "/with%20space/a%20b.jpg",
        srv.url("/über/bücher.jpg"): "/%C3%BCber/b%C3%BCcher.jpg",
        srv.url("/query.jpg?name=a b&city=Zürich"): "/query.jpg?name=a%20b&city=Z%C3%BCrich",
        srv.url("/kept%2Fescape.jpg"): "/kept%2Fescape.jpg",
        srv.url("/redirected"): "/with%20space/a%20b.jpg",
    }
    root, cfg = ingest_urls(tmp_path, list(good) + list(bad) + list(encoded), **{
        "download.allow_private_addresses": True, "download.deadline": DEADLINE,
        "download.max_body_bytes": MiB, "download.thread_count": 16})
    t0 = time.monotonic()
    s = download(root, cfg, progress=False)
    took = time.monotonic() - t0
    assert not s["failed"] and s["committed"] == s["shards"] == 1
    df = statuses(root)
    assert len(df) == len(good) + len(bad) + len(encoded)
    for url, (status, reason) in bad.items():
        assert df.loc[url, "status"] == status, (url, df.loc[url, "error_message"])
        assert reason in df.loc[url, "error_message"], (url, df.loc[url, "error_message"])
    for url, sent_path in encoded.items():
        assert df.loc[url, "status"] == "success", (url, df.loc[url, "error_message"])
        assert (df.loc[url, "original_width"], df.loc[url, "original_height"]) == (w3, h3)
    assert_intact(df, good, root)
    seen = {r.path for r in srv.log}
    assert set(encoded.values()) <= seen
    assert not any("X-Injected" in p or "\x00" in p for p in seen)  # never sent
    # the drip was cut at the deadline, not after its 20 s
    (drip,) = wait_ended(srv, "/drip.jpg")
    assert drip.aborted and drip.end - drip.start < DEADLINE + 1.5, drip
    assert took < 20
    # the huge bodies: the connection was closed, and little of the 2 GiB was ever sent
    for path in ("/huge-length.jpg", "/huge-chunked.jpg"):
        (req,) = wait_ended(srv, path)
        assert req.aborted and req.sent < 64 * MiB, req


# ------------------------------------------------------------------ formats, on Ray


def test_formats_outside_the_allow_list_and_header_bombs(tmp_path, ray_local, good_server):
    srv, good_paths = good_server
    good = {srv.url(p): wh for p, wh in good_paths.items()}
    bad = {}
    for fmt, name in (("HDR", "Radiance HDR"), ("PFM", "PFM")):  # 20000 x 20000 declared
        bad[srv.add(f"/bomb.{fmt.lower()}", Route(pixel_bomb(fmt), content_type="image/jpeg"))] = ("failed_to_resize", name)
    for fmt, name in (("TIFF", "TIFF"), ("BMP", "BMP")):
        bad[srv.add(f"/image.{fmt.lower()}", Route(other_format(fmt)))] = ("failed_to_resize", name)
    for fmt in ("PNG", "JPEG", "WEBP", "GIF"):
        bad[srv.add(f"/bomb-{fmt.lower()}", Route(pixel_bomb(fmt)))] = ("refused", "above max_pixels")
    root, cfg = ingest_urls(tmp_path, list(good) + list(bad), **{"download.allow_private_addresses": True})
    s = download(root, cfg, progress=False)
    assert not s["failed"] and s["committed"] == 1
    df = statuses(root)
    for url, (status, reason) in bad.items():
        assert df.loc[url, "status"] == status, (url, df.loc[url, "error_message"])
        assert reason in df.loc[url, "error_message"], (url, df.loc[url, "error_message"])
        if status == "failed_to_resize":
            assert "not a supported image (JPEG/PNG/WEBP/GIF)" in df.loc[url, "error_message"]
    assert_intact(df, good, root)


def test_opencv_pixel_ceiling_takes_effect_when_set_before_cv2():
    """The second line: OpenCV itself refuses to decode above max_pixels."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from mmloom.curate.download import opencv_pixel_ceiling\n"
        "assert opencv_pixel_ceiling(100)\n"
        "import cv2, numpy as np\n"
        "ok, buf = cv2.imencode('.png', np.zeros((20, 20, 3), np.uint8))\n"
        "try:\n"
        "    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)\n"
        "except cv2.error as e:\n"
        "    sys.exit('refused' if 'CV_IO_MAX_IMAGE_PIXELS' in str(e) else str(e))\n"
        "sys.exit('decoded' if img is not None else 'refused')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stderr.strip().splitlines()[-1] == "refused", r.stderr[-2000:]


# --------------------------------------------- the address guard, on a fake internet


class FakeInternet:
    """``.example`` names resolve to public addresses that reach the local server."""

    def __init__(self, monkeypatch, srv: LocalServer):
        self.srv = srv
        self.lookups: list[str] = []
        self.connects: list[str] = []  # every address a socket was asked to connect to
        self.names = {
            "img.example": [PUBLIC],
            "xn--bcher-kva.example": [PUBLIC],
            "dual.example": [PUBLIC6, PUBLIC],
            "mixed.example": [PUBLIC, "10.1.2.3"],
            "metadata.example": ["169.254.169.254"],
        }
        self.rebind_calls = 0
        real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

        def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
            host = host.decode() if isinstance(host, bytes) else host
            self.lookups.append(host)
            if host == "rebind.example":  # public at the first answer, loopback after
                self.rebind_calls += 1
                addrs = [PUBLIC] if self.rebind_calls == 1 else ["127.0.0.1"]
            elif host in self.names:
                addrs = self.names[host]
            elif host.endswith(".example"):
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            else:
                return real_getaddrinfo(host, port, family, type, proto, flags)
            out = []
            for a in addrs:
                v6 = ":" in a
                out.append((socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                            (a, int(port or 0), 0, 0) if v6 else (a, int(port or 0))))
            return out

        def connect(sock, address):
            self.connects.append(address[0])
            if address[0] in (PUBLIC, PUBLIC6):  # "the internet": the local server
                if address[0] == PUBLIC6:
                    raise ConnectionRefusedError(111, "Connection refused")  # no IPv6 route: try the next
                return real_connect(sock, ("127.0.0.1", srv.port))
            return real_connect(sock, address)

        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture()
def internet(monkeypatch, good_server):
    srv, good_paths = good_server
    return FakeInternet(monkeypatch, srv), good_paths


def run_shard_here(root, cfg):
    """The stage's own shard task, in this process (so the fake internet applies)."""
    d = cfg.download.model_dump()
    return download_shard(0, root, d, 1000, False, config_hash(d))


IPV6_FORMS = {  # literal -> the address the refusal names
    "[0:0:0:0:0:ffff:7f00:1]": "127.0.0.1",  # IPv4-mapped loopback
    "[::ffff:127.0.0.1]": "127.0.0.1",
    "[::1]": "::1",
    "[fd00:ec2::254]": "fd00:ec2::254",  # AWS metadata over IPv6
    "[fe80::1]": "fe80::1",
    "[fc00::1]": "fc00::1",
    "[::ffff:a9fe:a9fe]": "169.254.169.254",  # mapped metadata address
    "[::127.0.0.1]": "127.0.0.1",  # IPv4-compatible
    "[2002:7f00:1::]": "127.0.0.1",  # 6to4
    "[64:ff9b::a9fe:a9fe]": "169.254.169.254",  # NAT64
    "[::]": "::",
}
LEGACY_FORMS = ["2130706433", "0177.0.0.1", "0x7f000001", "127.1", "0.0.0.0", "127.0.0.1", "localhost"]


def test_guard_refuses_every_non_public_form_and_connects_only_where_it_checked(tmp_path, ray_local, internet):
    fake, good_paths = internet
    srv = fake.srv
    port = srv.port
    good = {f"http://img.example{p}": wh for p, wh in good_paths.items()}
    first = next(iter(good_paths))
    srv.add("/to-loopback", Route(redirect_to=srv.url(first)))
    srv.add("/to-mapped", Route(redirect_to=f"http://[::ffff:127.0.0.1]:{port}{first}"))
    refused = {}
    for lit, addr in IPV6_FORMS.items():
        refused[f"http://{lit}/x.jpg"] = addr
        refused[f"http://{lit}:{port}{first}"] = addr
    for host in LEGACY_FORMS:
        refused[f"http://{host}:{port}{first}"] = "non-public address"
    refused.update({
        "http://nowhere.example/x.jpg": "nowhere.example does not resolve",
        "http://metadata.example/latest/meta-data/": "169.254.169.254",
        "http://mixed.example/x.jpg": "10.1.2.3",  # one private answer is enough
        "http://img.example/to-loopback": "127.0.0.1",
        "http://img.example/to-mapped": "127.0.0.1",
    })
    also_ok = {
        f"http://rebind.example:{port}{first}": good_paths[first],  # checked once, connected to that answer
        f"http://bücher.example{first}": good_paths[first],  # IDN host
        f"http://dual.example{first}": good_paths[first],  # first address fails, the next checked one works
    }
    root, cfg = ingest_urls(tmp_path, list(good) + list(refused) + list(also_ok))
    assert not cfg.download.allow_private_addresses
    fake.connects.clear()
    run_shard_here(root, cfg)
    df = statuses(root)
    for url, addr in refused.items():
        assert df.loc[url, "status"] == "refused", (url, df.loc[url, "error_message"])
        assert addr in df.loc[url, "error_message"], (url, df.loc[url, "error_message"])
    assert_intact(df, {**good, **also_ok}, root)
    # nothing but the checked public addresses was ever connected to
    assert set(fake.connects) <= {PUBLIC, PUBLIC6}, fake.connects
    assert fake.rebind_calls == 1
    assert any(r.host == "xn--bcher-kva.example" for r in srv.log)


# ------------------------------------------------------------- unit tests, fast


@pytest.mark.parametrize("addr", [
    "127.0.0.1", "10.0.0.1", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "224.0.0.1", "255.255.255.255", "192.0.2.1", "::1", "::", "fd00:ec2::254", "fe80::1", "fc00::1",
    "ff02::1", "fec0::1", "2001:db8::1", "::ffff:7f00:1", "0:0:0:0:0:ffff:7f00:1", "::ffff:a9fe:a9fe",
    "::127.0.0.1", "::a9fe:a9fe", "2002:7f00:1::", "2002:a9fe:a9fe::1", "64:ff9b::7f00:1",
    "64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "::ffff:0:7f00:1", "2001::1", "fe80::1%1",
])
def test_non_public_addresses(addr):
    from mmloom.curate import netguard

    assert netguard.non_public(addr) is not None


@pytest.mark.parametrize("addr", [
    "93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
])
def test_public_addresses(addr):
    from mmloom.curate import netguard

    assert netguard.non_public(addr) is None


def test_embedded_ipv4_names_the_address_inside():
    from mmloom.curate import netguard

    assert "embeds 127.0.0.1" in netguard.non_public("2002:7f00:1::")
    assert netguard.embedded_ipv4(ipaddress.IPv6Address("64:ff9b::a9fe:a9fe")) == ipaddress.IPv4Address("169.254.169.254")
    assert netguard.embedded_ipv4(ipaddress.IPv6Address("2606:4700::1111")) is None


@pytest.mark.parametrize("url,target", [
    ("http://h/a b.jpg", "/a%20b.jpg"),
    ("http://h/über/ä.jpg?q=ß x&y=1#frag", "/%C3%BCber/%C3%A4.jpg?q=%C3%9F%20x&y=1"),
    ("http://h/a%2Fb%20c.jpg?x=%41", "/a%2Fb%20c.jpg?x=%41"),
    ("http://h/100%.jpg", "/100%.jpg"),  # a lone % stays, as browsers send it
    ("http://h", "/"),
    ("http://h/p;a=1/@:~!$&'()*+,=-._", "/p;a=1/@:~!$&'()*+,=-._"),
    ('http://h/"<>`{}|^', "/%22%3C%3E%60%7B%7D%7C%5E"),
])
def test_request_target_is_encoded_like_a_browser(url, target):
    from mmloom.curate import fetch

    assert fetch.parse_url(url).target == target


def test_host_is_idna_encoded_and_ports_checked():
    from mmloom.curate import fetch

    u = fetch.parse_url("https://Bücher.Example:8443/x")
    assert (u.scheme, u.host, u.port, u.target) == ("https", "xn--bcher-kva.example", 8443, "/x")
    assert fetch.parse_url("http://[::1]/").host == "::1"
    for bad, why in [("http://h/a\r\nX: y", "control character"), ("http://h/\x00", "control character"),
                     ("http://h\t/", "control character"), ("ftp://h/x", "scheme"), ("http://h:99999/", "port"),
                     ("http:///x", "no host"), ("http://[::1/", "does not parse")]:
        with pytest.raises(fetch.FetchError, match=why):
            fetch.parse_url(bad)


def test_rebinding_resolver_is_asked_once_and_its_second_answer_never_used(internet):
    from mmloom.curate import fetch

    fake, good_paths = internet
    first = next(iter(good_paths))
    limits = fetch.Limits(timeout=5, deadline=10, max_body_bytes=32 * MiB, allow_private=False)
    for _ in range(3):  # every request resolves once and connects to what it checked
        fake.connects.clear()
        lookups = len(fake.lookups)
        body, _headers = fetch.fetch(f"http://rebind.example:{fake.srv.port}{first}", limits, "mmloom-test")
        assert body.getbuffer().nbytes > 1000
        assert fake.lookups[lookups:] == ["rebind.example"] and fake.connects == [PUBLIC]
        fake.rebind_calls = 0


def test_dns_failure_is_refused_and_allowed_private_still_connects_to_the_checked_address(internet):
    from mmloom.curate import fetch

    fake, _ = internet
    guarded = fetch.Limits(timeout=5, deadline=10, max_body_bytes=MiB, allow_private=False)
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch("http://nowhere.example/x.jpg", guarded, None)
    assert e.value.refused and "nowhere.example does not resolve" in str(e.value)
    with pytest.raises(fetch.FetchError) as e:
        fetch.fetch("http://nowhere.example/x.jpg", guarded._replace(allow_private=True), None)
    assert not e.value.refused and "does not resolve" in str(e.value)


def test_deadline_covers_a_server_that_never_answers(good_server):
    from mmloom.curate import fetch

    srv, _ = good_server
    srv.add("/silent.jpg", Route(b"x", delay=5))
    limits = fetch.Limits(timeout=30, deadline=1, max_body_bytes=MiB, allow_private=True)
    t0 = time.monotonic()
    with pytest.raises(fetch.FetchError, match="deadline of 1 s"):
        fetch.fetch(srv.url("/silent.jpg"), limits, None)
    assert time.monotonic() - t0 < 1.5


def test_memory_stays_bounded_on_an_endless_body(good_server):
    from mmloom.curate import fetch

    srv, _ = good_server
    srv.add("/endless.jpg", Route(stream_bytes=2**34, chunked=True))
    limits = fetch.Limits(timeout=5, deadline=20, max_body_bytes=4 * MiB, allow_private=True)
    tracemalloc.start()
    try:
        with pytest.raises(fetch.FetchError, match="above max_body_bytes"):
            fetch.fetch(srv.url("/endless.jpg"), limits, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 * MiB, peak
    (req,) = wait_ended(srv, "/endless.jpg")
    assert req.aborted and req.sent < 64 * MiB


# ---------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for img.example: (cert file, key file, PEM text)."""
    pytest.importorskip("cryptography")
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "img.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("img.example")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (d / "cert.pem").write_bytes(pem)
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return str(d / "cert.pem"), str(d / "key.pem"), pem.decode()


def test_tls_checks_the_certificate_against_the_host_name_while_connecting_to_the_checked_address(
        monkeypatch, certificate, images):
    import ssl

    from mmloom.curate import fetch

    cert, key, pem = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    sni = []
    server_ctx.sni_callback = lambda sock, name, ctx: sni.append(name)
    with LocalServer({"/a.jpg": Route(images[0][1])}, tls=server_ctx) as srv:
        fake = FakeInternet(monkeypatch, srv)
        fake.names["other.example"] = [PUBLIC]
        limits = fetch.Limits(timeout=5, deadline=10, max_body_bytes=MiB, allow_private=False)
        # the system's trust store does not know this certificate: verification is on
        with pytest.raises(fetch.FetchError, match="CERTIFICATE_VERIFY_FAILED"):
            fetch.fetch("https://img.example/a.jpg", limits, None)
        trusted = ssl.create_default_context(cadata=pem)
        trusted.sslsocket_class = fetch._TLSSocket
        monkeypatch.setattr(fetch, "_tls_context", trusted)
        fake.connects.clear()
        body, _ = fetch.fetch("https://img.example/a.jpg", limits, None)
        assert body.getvalue() == images[0][1]
        assert fake.connects == [PUBLIC] and sni[-1] == "img.example"
        assert srv.log[-1].host == "img.example"
        # same address, another name: the certificate is checked against the name
        with pytest.raises(fetch.FetchError, match="Hostname mismatch|doesn't match|CERTIFICATE_VERIFY_FAILED"):
            fetch.fetch("https://other.example/a.jpg", limits, None)


def test_deadline_covers_a_tls_handshake_that_never_ends():
    from mmloom.curate import fetch

    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, then says nothing
        port = listener.getsockname()[1]
        limits = fetch.Limits(timeout=30, deadline=1, max_body_bytes=MiB, allow_private=True)
        t0 = time.monotonic()
        with pytest.raises(fetch.FetchError, match="deadline of 1 s"):
            fetch.fetch(f"https://127.0.0.1:{port}/x.jpg", limits, None)
        assert time.monotonic() - t0 < 1.5


def test_retry_failed_takes_dns_failures_but_not_real_refusals():
    from mmloom.curate.download import retryable

    assert retryable({"status": "failed_to_download", "error_message": "deadline of 30 s exceeded"})
    assert retryable({"status": "failed_to_resize", "error_message": "truncated image"})
    assert retryable({"status": "refused", "error_message": "nowhere.example does not resolve (Name or service not known); refused since its address cannot be checked"})
    assert not retryable({"status": "refused", "error_message": "h resolves to non-public address 10.0.0.1"})
    assert not retryable({"status": "success", "error_message": None})


def test_pillow_default_ceiling_does_not_override_max_pixels():
    import io

    from PIL import Image

    from mmloom.imageguard import inspect

    Image.MAX_IMAGE_PIXELS = 1000  # a caller that left Pillow's (smaller) ceiling on
    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, "PNG")
    assert inspect(buf.getvalue(), 10**6).pixels == 10000


def test_score_checks_each_images_header_before_decoding(pics, monkeypatch):
    """A shard may come from anywhere: an image whose header promises more than max_pixels
    is refused before a pixel is decoded, on the OpenCV way and on Pillow's (which also
    keeps to the download stage's formats)."""
    import io

    from PIL import Image

    from mmloom import imageguard as S
    from mmloom.imageguard import ImageRejected

    small = pics["astronaut.jpg"].resize((100, 80))
    jpeg, png = (_encoded(small, f) for f in ("JPEG", "PNG"))
    b = io.BytesIO()
    small.save(b, "BMP")
    for data in (jpeg, png):
        assert S.decode_rgb(data, 8000).size == (100, 80)
        with pytest.raises(ImageRejected, match="pixels|max_pixels|bomb|large"):
            S.decode_rgb(data, 7999)
    with pytest.raises(ImageRejected):
        S.decode_rgb(b.getvalue(), 10**8)
    import cv2

    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded a refused JPEG"))
    with pytest.raises(ImageRejected):
        S.decode_rgb(jpeg, 7999)
    assert Image.open(io.BytesIO(jpeg)).size == (100, 80)



@pytest.mark.slow  # the session's pipeline run
def test_ground_and_build_check_each_images_header_and_name_the_tar_member(pipeline_run, tmp_path):
    """A shard may come from anywhere: ground and build read each image through the header
    check with download.max_pixels (the stage's setting), and an image above it stops the
    shard with an error naming the tar and the member, never a bare decoder error."""
    import re
    import shutil

    from mmloom.curate import build as B
    from mmloom.curate import ground as G
    from mmloom.curate.dataset import dataset_config
    from mmloom.errors import UserError
    from mmloom.manifests.store import ShardStore

    root = tmp_path / "ds"
    shutil.copytree(pipeline_run[0], root)
    cfg = dataset_config(str(root), None)
    store = ShardStore(str(root))
    shard = sorted(store.committed_shards("build"))[0]
    first = sorted(G.selected_by_shard(store)[shard], key=lambda r: r["key"])[0]["key"]
    assert G.STAGE_DEF.extra(store, cfg)["max_pixels"] == B.STAGE_DEF.extra(store, cfg)["max_pixels"] == cfg.download.max_pixels
    worker = G.GroundWorker(cfg.ground.model_dump())
    member = re.compile(rf"images/0000{shard}\.tar: member \w+\.jpg: .*above max_pixels 100")
    with pytest.raises(UserError, match=member):
        worker.run(shard, str(root), "h", "jpg", max_pixels=100)
    with pytest.raises(UserError, match=rf"images/0000{shard}\.tar: member {first}\.jpg: .*above max_pixels 100"):
        B.build_shard(shard, str(root), cfg.build.model_dump(), "h", "jpg", max_pixels=100)


def _encoded(im, fmt: str) -> bytes:
    import io

    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()
