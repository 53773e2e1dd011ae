#!/usr/bin/env python3
"""Captures the first bytes real clients send (or real servers greet with) for the
application-protocol detectors' tests: netfilter/tests/corpus/l7/<app>-<program>.bin.

Each capture runs the real program against a listener on loopback that records what
arrives (TCP: the first 4 KiB or 2 s of the connection; UDP: one datagram) and answers
nothing, so the bytes are exactly the program's opening. Server-first protocols (NATS)
are captured by connecting to the real server. Programs that are not installed are
skipped and said so. Run as any user:

    python3 scripts/capture-l7-clients.py [OUT_DIR]

Python client libraries come from a virtualenv given by L7_VENV (pip install grpcio
kafka-python pymongo python-tds oracledb cassandra-driver pika kazoo); without it those
captures are skipped.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "netfilter", "tests", "corpus", "l7")
VENV_PY = os.path.join(os.environ.get("L7_VENV", "/nonexistent"), "bin", "python")


def listen(udp=False, at=("127.0.0.1", 0)):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(at)
    if not udp:
        s.listen(4)
    return s


def record(s, udp, box, answer=b""):
    s.settimeout(20)
    try:
        if udp:
            data, _ = s.recvfrom(65535)
            box.append(data)
            return
        c, _ = s.accept()
        c.settimeout(2)
        if answer:
            c.sendall(answer)
        data = b""
        end = time.time() + 2
        while len(data) < 4096 and time.time() < end:
            try:
                chunk = c.recv(4096)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
        box.append(data)
        c.close()
    except OSError:
        pass


def capture(name, argv_of_port, udp=False, need=None, at=("127.0.0.1", 0), answer=b""):
    prog = need or argv_of_port(0)[0]
    if prog != VENV_PY and shutil.which(prog) is None or prog == VENV_PY and not os.path.exists(VENV_PY):
        print(f"  skip {name}: {prog} is not installed")
        return
    try:
        s = listen(udp, at)
    except OSError as e:
        print(f"  skip {name}: cannot listen on {at}: {e}")
        return
    port = s.getsockname()[1]
    box = []
    t = threading.Thread(target=record, args=(s, udp, box, answer))
    t.start()
    try:
        subprocess.run(argv_of_port(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       timeout=15, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pass
    t.join()
    s.close()
    if not box or not box[0]:
        print(f"  FAIL {name}: nothing arrived")
        return
    with open(os.path.join(OUT, name + ".bin"), "wb") as f:
        f.write(box[0])
    print(f"  {name}: {len(box[0])} bytes")


def py(code):
    return lambda p: [VENV_PY, "-c", code.replace("PORT", str(p))]


def server_greeting(name, argv, port):
    if shutil.which(argv[0]) is None:
        print(f"  skip {name}: {argv[0]} is not installed")
        return
    srv = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        data = b""
        for _ in range(50):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                    data = c.recv(4096)
                    break
            except OSError:
                time.sleep(0.1)
        if data:
            with open(os.path.join(OUT, name + ".bin"), "wb") as f:
                f.write(data)
            print(f"  {name}: {len(data)} bytes")
        else:
            print(f"  FAIL {name}: no greeting")
    finally:
        srv.kill()
        srv.wait()


def main():
    os.makedirs(OUT, exist_ok=True)
    print(f"capturing into {OUT}")
    capture("ssh-openssh", lambda p: ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=3",
                                       "-p", str(p), "x@127.0.0.1", "true"])
    capture("mqtt-mosquitto_pub", lambda p: ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(p),
                                             "-t", "pay/events", "-m", "hello", "-q", "0"])
    capture("mqtt5-mosquitto_pub", lambda p: ["mosquitto_pub", "-V", "mqttv5", "-h", "127.0.0.1",
                                              "-p", str(p), "-t", "t", "-m", "m"])
    capture("memcached-memcstat", lambda p: ["memcstat", f"--servers=127.0.0.1:{p}"])
    capture("memcached-memccat", lambda p: ["memccat", f"--servers=127.0.0.1:{p}", "session:42"])
    capture("memcached-memccp-binary", lambda p: ["memccp", "--binary", f"--servers=127.0.0.1:{p}",
                                                  "/etc/hostname"])
    capture("ldap-ldapsearch", lambda p: ["ldapsearch", "-x", "-H", f"ldap://127.0.0.1:{p}",
                                          "-b", "dc=example,dc=org", "(uid=alice)"])
    capture("ldap-ldapwhoami-bind", lambda p: ["ldapwhoami", "-x", "-H", f"ldap://127.0.0.1:{p}",
                                               "-D", "cn=admin,dc=example,dc=org", "-w", "x"])
    # ntpdig and busybox nslookup take no port: their well-known ports on a loopback
    # address of their own (binding them needs root).
    capture("ntp-ntpdig", lambda p: ["ntpdig", "-t", "1", "127.0.0.9"], udp=True,
            at=("127.0.0.9", 123))
    capture("http2-curl", lambda p: ["curl", "-s", "--max-time", "3", "--http2-prior-knowledge",
                                     f"http://127.0.0.1:{p}/v1/payments"])
    capture("syslog-logger-udp", lambda p: ["logger", "-n", "127.0.0.1", "-P", str(p), "-d",
                                            "payment settled"], udp=True)
    capture("syslog-logger-tcp", lambda p: ["logger", "-n", "127.0.0.1", "-P", str(p), "-T",
                                            "--octet-count", "payment settled"])
    capture("syslog-logger-rfc3164", lambda p: ["logger", "-n", "127.0.0.1", "-P", str(p), "-d",
                                                "--rfc3164", "payment settled"], udp=True)
    capture("http-curl", lambda p: ["curl", "-s", "--max-time", "3", f"http://127.0.0.1:{p}/"])
    capture("redis-redis-cli", lambda p: ["redis-cli", "-p", str(p), "PING"])
    capture("postgres-psql", lambda p: ["psql", f"postgresql://app@127.0.0.1:{p}/cards?sslmode=disable",
                                        "-c", "select 1"])
    capture("tls-openssl", lambda p: ["openssl", "s_client", "-connect", f"127.0.0.1:{p}",
                                      "-servername", "api.psp.example"])
    capture("dns-busybox-nslookup", lambda p: ["busybox", "nslookup", "api.acquirer.example",
                                               "127.0.0.9"], udp=True, at=("127.0.0.9", 53))
    capture("grpc-grpcio", py(
        "import grpc\n"
        "ch=grpc.insecure_channel('127.0.0.1:PORT')\n"
        "f=ch.unary_unary('/payments.v1.Payments/Authorize')\n"
        "try: f(b'\\x0a\\x03abc', timeout=2)\n"
        "except Exception: pass\n"), need=VENV_PY,
        # An HTTP/2 server's SETTINGS and its ack: gRPC waits for them before its request.
        answer=bytes([0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0]))
    capture("kafka-kafka_python", py(
        "from kafka import KafkaProducer\n"
        "try: KafkaProducer(bootstrap_servers='127.0.0.1:PORT', request_timeout_ms=1500, max_block_ms=1500)\n"
        "except Exception: pass\n"), need=VENV_PY)
    capture("mongodb-pymongo", py(
        "import pymongo\n"
        "c=pymongo.MongoClient('mongodb://127.0.0.1:PORT/', serverSelectionTimeoutMS=1500, connectTimeoutMS=1500)\n"
        "try: c.admin.command('ping')\n"
        "except Exception: pass\n"), need=VENV_PY)
    capture("mssql-python_tds", py(
        "import pytds\n"
        "try: pytds.connect('127.0.0.1', port=PORT, user='sa', password='x', login_timeout=2, timeout=2)\n"
        "except Exception: pass\n"), need=VENV_PY)
    capture("oracle-oracledb", py(
        "import oracledb\n"
        "try: oracledb.connect(user='app', password='x', dsn='127.0.0.1:PORT/CARDS', tcp_connect_timeout=2)\n"
        "except Exception: pass\n"), need=VENV_PY)
    capture("cassandra-cassandra_driver", py(
        "from cassandra.cluster import Cluster\n"
        "try: Cluster(['127.0.0.1'], port=PORT, connect_timeout=2, control_connection_timeout=2, protocol_version=4).connect()\n"
        "except Exception: pass\n"), need=VENV_PY)
    capture("amqp-pika", py(
        "import pika\n"
        "try: pika.BlockingConnection(pika.ConnectionParameters('127.0.0.1', PORT, socket_timeout=2, blocked_connection_timeout=2, connection_attempts=1))\n"
        "except Exception: pass\n"), need=VENV_PY)
    capture("zookeeper-kazoo", py(
        "from kazoo.client import KazooClient\n"
        "z=KazooClient(hosts='127.0.0.1:PORT', timeout=2, connection_retry={'max_tries':0})\n"
        "try: z.start(timeout=2)\n"
        "except Exception: pass\n"), need=VENV_PY)
    server_greeting("nats-nats_server", ["nats-server", "-a", "127.0.0.1", "-p", "14222"], 14222)


if __name__ == "__main__":
    main()
