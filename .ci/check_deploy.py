#!/usr/bin/env python3
"""Consistency checks of the shipping artefacts, run by .ci/static.sh (no Docker, no cluster).

    python3 .ci/check_deploy.py --binary target/release/verigate --build-cmd "cargo build --release --locked"

Dockerfile: multi-stage; exactly one `cargo build` and it is the CI command; the build stage
copies every file the crate needs (Cargo targets, include_str!/include_bytes! sources); the final
stage runs as a numeric non-root user, declares the data dir as a VOLUME and health-checks with
`verigate probe`; its ENV passes `verigate config check`.

systemd/verigate.service: ExecStart reads its config from ConfigurationDirectory, the data dir
is the StateDirectory, every LoadCredential= is documented as the *_file key that reads it, and
that documented configuration plus the unit's Environment= passes `verigate config check`.

deploy/kubernetes/*.yaml (PyYAML): volumes, volume mounts, ConfigMaps, Secrets, claims, probes,
ports and env references agree with each other, with the image (binary path, uid) and with the
configuration in the ConfigMap, which (with the Secret's files) passes `verigate config check`.

Prints one line per failed check and exits 1 when any failed.
"""

import argparse
import glob
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tempfile

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CREDENTIALS_DIR = "/run/credentials/verigate.service"

failures = []
passed = 0


def check(ok, what):
    global passed
    if ok:
        passed += 1
    else:
        failures.append(what)
        print(f"FAIL: {what}")
    return ok


def under(path, root):
    path, root = posixpath.normpath(path), posixpath.normpath(root)
    return path == root or path.startswith(root.rstrip("/") + "/")


def config_check(binary, config_text, env, files, what):
    """`verigate config check` on config_text, with /-rooted paths in files written to a temp
    dir and the config's references to them rewritten. Returns True when it passes."""
    with tempfile.TemporaryDirectory() as tmp:
        for path, content in files.items():
            local = os.path.join(tmp, "files", path.lstrip("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "w") as f:
                f.write(content)
            config_text = config_text.replace(f'"{path}"', f'"{local}"')
        cfg = os.path.join(tmp, "config.toml")
        with open(cfg, "w") as f:
            f.write(config_text)
        run_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
        p = subprocess.run([binary, "config", "check", "--config", cfg], env=run_env,
                           capture_output=True, text=True)
        return check(p.returncode == 0,
                     f"{what}: `verigate config check` failed: {p.stderr.strip() or p.stdout.strip()}")


def generated_secrets(binary):
    out = subprocess.run([binary, "keys", "generate"], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r'^(\w+) = "([^"]*)"', out, re.M))


# ---------------------------------------------------------------------------------- Dockerfile

def parse_dockerfile(path):
    """[(instruction, arguments)] with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in open(path):
        s = line.strip()
        if not buf and (not s or s.startswith("#")):
            continue
        if buf and s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        buf += s
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), " ".join(args.split())))
        buf = ""
    return out


def env_pairs(args):
    """ENV a=b c="d e" (or the legacy ENV a b) → dict."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


def json_or_shell(args):
    a = args.strip()
    if a.startswith("["):
        import json
        return json.loads(a)
    return shlex.split(a)


def crate_inputs():
    """Repository paths the build needs: Cargo target files, path dependencies and include_*!
    sources."""
    with open(os.path.join(REPO, "Cargo.toml"), "rb") as f:
        manifest = tomllib.load(f)
    paths = {"Cargo.toml", "Cargo.lock"}
    for kind in ("lib", "bin", "bench", "example", "test"):
        targets = manifest.get(kind, [])
        for t in targets if isinstance(targets, list) else [targets]:
            if "path" in t:
                paths.add(posixpath.normpath(t["path"]))
    # Path dependencies, among them the patched engine under vendor/ ([patch.crates-io]).
    deps = [manifest.get("dependencies", {})] + list(manifest.get("patch", {}).values())
    for table in deps:
        for spec in table.values():
            if isinstance(spec, dict) and "path" in spec:
                paths.add(posixpath.normpath(spec["path"]))
    for rs in glob.glob(os.path.join(REPO, "src", "**", "*.rs"), recursive=True):
        for m in re.finditer(r'include_(?:str|bytes)!\(\s*"([^"]+)"', open(rs).read()):
            p = os.path.normpath(os.path.join(os.path.dirname(rs), m.group(1)))
            paths.add(os.path.relpath(p, REPO))
    return sorted(paths)


def check_dockerfile(path, build_cmd, binary):
    print(f"== {os.path.relpath(path, REPO)}")
    instrs = parse_dockerfile(path)
    froms = [i for i, (k, _) in enumerate(instrs) if k == "FROM"]
    check(len(froms) >= 2, "Dockerfile: not multi-stage (fewer than two FROM)")
    stages = [instrs[a:b] for a, b in zip(froms, froms[1:] + [len(instrs)])]
    build, final = stages[0], stages[-1]

    builds = [args for k, args in instrs if k == "RUN" and "cargo build" in args]
    check(len(builds) == 1, f"Dockerfile: expected one RUN with `cargo build`, found {len(builds)}")
    for args in builds:
        cmds = [c.strip() for c in re.split(r"&&|;", args) if "cargo build" in c]
        check(cmds == [build_cmd],
              f"Dockerfile: cargo build command is {cmds!r}, CI builds with {build_cmd!r}")

    copied = []
    for k, args in build:
        if k == "COPY" and "--from" not in args:
            srcs = [w for w in json_or_shell(args) if not w.startswith("--")][:-1]
            copied += [posixpath.normpath(s.rstrip("/")) for s in srcs]
    for need in crate_inputs():
        check(any(c == "." or under(need, c) for c in copied),
              f"Dockerfile: the build stage does not COPY {need} (the crate needs it)")
    if os.path.exists(os.path.join(REPO, ".dockerignore")):
        ignored = [l.strip().rstrip("/") for l in open(os.path.join(REPO, ".dockerignore"))
                   if l.strip() and not l.startswith("#")]
        for need in crate_inputs():
            check(not any(under(need, i) for i in ignored), f".dockerignore excludes {need}")

    users = [args for k, args in final if k == "USER"]
    user = users[-1] if users else "root"
    uid = user.split(":")[0]
    check(uid.isdigit() and uid != "0",
          f"Dockerfile: final USER {user!r} is not a numeric non-root uid (Kubernetes runAsNonRoot needs one)")

    env = {}
    for k, args in final:
        if k == "ENV":
            env.update(env_pairs(args))
    data_dir = env.get("VERIGATE_DATA_DIR")
    check(data_dir is not None, "Dockerfile: final stage sets no VERIGATE_DATA_DIR")
    volumes = [v for k, args in final if k == "VOLUME" for v in json_or_shell(args)]
    check(data_dir in volumes, f"Dockerfile: data dir {data_dir} is not a VOLUME (volumes: {volumes})")

    copies_bin = [args for k, args in final if k == "COPY" and "--from=" in args
                  and "target/release/verigate" in args]
    check(len(copies_bin) == 1, "Dockerfile: final stage does not COPY target/release/verigate from the build stage")
    bin_path = json_or_shell(copies_bin[0])[-1] if copies_bin else None
    entry = [json_or_shell(args) for k, args in final if k == "ENTRYPOINT"]
    check(bool(entry) and entry[-1][0] == bin_path, f"Dockerfile: ENTRYPOINT is not {bin_path}")
    health = [args for k, args in final if k == "HEALTHCHECK"]
    check(len(health) == 1, "Dockerfile: no HEALTHCHECK")
    for h in health:
        cmd = json_or_shell(h.split(" CMD ", 1)[1]) if " CMD " in h else []
        check(cmd[:2] == [bin_path, "probe"], f"Dockerfile: HEALTHCHECK is not `{bin_path} probe`: {h}")
    exposed = {int(p.split("/")[0]) for k, args in final if k == "EXPOSE" for p in args.split()}
    for key in ("VERIGATE_LISTEN__API", "VERIGATE_LISTEN__PUBLIC"):
        if key in env:
            port = int(env[key].rsplit(":", 1)[1])
            check(port in exposed, f"Dockerfile: {key}={env[key]} but port {port} is not EXPOSEd")
    config_check(binary, "", env, {}, "Dockerfile ENV")
    return {"uid": int(uid) if uid.isdigit() else None, "binary": bin_path, "data_dir": data_dir}


# ---------------------------------------------------------------------------------- systemd

def parse_unit(path):
    """{section: [(key, value)]} keeping repeated keys in order, plus the comment lines."""
    sections, comments, cur = {}, [], None
    for line in open(path):
        s = line.strip()
        if s.startswith(("#", ";")):
            comments.append(s)
        elif s.startswith("["):
            cur = sections.setdefault(s.strip("[]"), [])
        elif "=" in s and cur is not None:
            k, v = s.split("=", 1)
            cur.append((k.strip(), v.strip()))
    return sections, comments


def check_unit(path, binary):
    print(f"== {os.path.relpath(path, REPO)}")
    sections, comments = parse_unit(path)
    svc = sections.get("Service", [])
    get = lambda key: [v for k, v in svc if k == key]
    exec_start = shlex.split(get("ExecStart")[-1])
    check(exec_start[1:2] == ["serve"], f"unit: ExecStart does not run `verigate serve`: {exec_start}")
    cfg = exec_start[exec_start.index("--config") + 1] if "--config" in exec_start else "/etc/verigate/config.toml"
    conf_dirs = " ".join(get("ConfigurationDirectory")).split()
    check(any(under(cfg, "/etc/" + d) for d in conf_dirs),
          f"unit: --config {cfg} is not under ConfigurationDirectory= {conf_dirs}")
    env = {}
    for v in get("Environment"):
        for w in shlex.split(v):
            k, _, val = w.partition("=")
            env[k] = val
    state_dirs = " ".join(get("StateDirectory")).split()
    data_dir = env.get("VERIGATE_DATA_DIR")
    check(data_dir is not None and any(under(data_dir, "/var/lib/" + d) for d in state_dirs),
          f"unit: VERIGATE_DATA_DIR={data_dir} is not the StateDirectory= {state_dirs}")
    check(get("DynamicUser") == ["yes"] and not get("User"), "unit: expected DynamicUser=yes and no User=")

    # The documented mapping: '#   [section] key = "/run/credentials/verigate.service/NAME"'.
    documented = {}
    for c in comments:
        m = re.match(r'#\s*\[(\w+)\]\s*(\w+)\s*=\s*"' + re.escape(CREDENTIALS_DIR) + r'/([\w.-]+)"', c)
        if m:
            documented[m.group(3)] = (m.group(1), m.group(2))
    creds = [v.split(":", 1)[0] for v in get("LoadCredential")]
    for name in creds:
        check(name in documented,
              f"unit: LoadCredential={name} is not documented as a *_file key reading {CREDENTIALS_DIR}/{name}")
    secrets = generated_secrets(binary)
    sample = {"signing-keys": secrets["signing_key"] + "\n"}
    by_section = {}
    for name, (section, key) in documented.items():
        check(key.endswith("_file"), f"unit: documented key [{section}] {key} is not a *_file key")
        by_section.setdefault(section, []).append(f'{key} = "{CREDENTIALS_DIR}/{name}"')
    text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in by_section.items())
    files = {f"{CREDENTIALS_DIR}/{n}": sample.get(n, "placeholder-secret\n") for n in documented}
    config_check(binary, text, env, files, "unit Environment= with the documented credential keys")


# ---------------------------------------------------------------------------------- Kubernetes

def port_ok(port, ports):
    return any(port in (p.get("containerPort"), p.get("name")) for p in ports)


def check_k8s(paths, image, binary):
    docs = []
    for p in paths:
        print(f"== {os.path.relpath(p, REPO)}")
        with open(p) as f:
            docs += [d for d in yaml.safe_load_all(f) if d]
    by_kind = {}
    for d in docs:
        check("apiVersion" in d and "kind" in d and "name" in d.get("metadata", {}),
              f"k8s: a document lacks apiVersion, kind or metadata.name: {str(d)[:80]}")
        by_kind.setdefault(d.get("kind"), {})[d["metadata"]["name"]] = d
    secrets = {n: {**s.get("data", {}), **s.get("stringData", {})} for n, s in by_kind.get("Secret", {}).items()}
    configmaps = {n: c.get("data", {}) for n, c in by_kind.get("ConfigMap", {}).items()}
    claims = set(by_kind.get("PersistentVolumeClaim", {}))
    workloads = [d for k in ("Deployment", "StatefulSet", "DaemonSet") for d in by_kind.get(k, {}).values()]
    check(bool(workloads), "k8s: no Deployment/StatefulSet/DaemonSet")
    generated = generated_secrets(binary)

    for w in workloads:
        name = w["metadata"]["name"]
        spec = w["spec"]
        sel = spec.get("selector", {}).get("matchLabels", {})
        labels = spec["template"].get("metadata", {}).get("labels", {})
        check(all(labels.get(k) == v for k, v in sel.items()),
              f"k8s {name}: selector {sel} does not match the pod labels {labels}")
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                check(v["configMap"]["name"] in configmaps, f"k8s {name}: volume {v['name']} names a missing ConfigMap")
            if "secret" in v:
                check(v["secret"]["secretName"] in secrets, f"k8s {name}: volume {v['name']} names a missing Secret")
            if "persistentVolumeClaim" in v:
                check(v["persistentVolumeClaim"]["claimName"] in claims,
                      f"k8s {name}: volume {v['name']} names a missing PersistentVolumeClaim")
        used = set()
        all_ports = []
        for c in pod.get("containers", []):
            cname = f"k8s {name}/{c['name']}"
            ports = c.get("ports", [])
            all_ports += ports
            mounts = c.get("volumeMounts", [])
            for m in mounts:
                used.add(m["name"])
                check(m["name"] in volumes, f"{cname}: volumeMount {m['name']} has no volume")
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    check(ref["key"] in secrets.get(ref["name"], {}),
                          f"{cname}: env {e['name']} reads missing Secret key {ref['name']}/{ref['key']}")
                ref = e.get("valueFrom", {}).get("configMapKeyRef")
                if ref:
                    check(ref["key"] in configmaps.get(ref["name"], {}),
                          f"{cname}: env {e['name']} reads missing ConfigMap key {ref['name']}/{ref['key']}")
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                pr = c.get(probe)
                if not pr:
                    continue
                for how in ("tcpSocket", "httpGet", "grpc"):
                    if how in pr:
                        check(port_ok(pr[how]["port"], ports),
                              f"{cname}: {probe} port {pr[how]['port']} is not a port of the container")
            if not c.get("image", "").split("/")[-1].startswith("verigate"):
                continue

            # The verigate container.
            def mount_of(path):
                ms = [m for m in mounts if under(path, m["mountPath"])]
                return max(ms, key=lambda m: len(m["mountPath"])) if ms else None

            def file_in_mount(path, what):
                """The content behind path: a ConfigMap or Secret key, or None."""
                m = mount_of(path)
                if not check(m is not None, f"{cname}: {what} {path} is on no volume mount"):
                    return None
                v = volumes.get(m["name"], {})
                key = posixpath.relpath(path, m["mountPath"])
                src = (configmaps.get(v["configMap"]["name"], {}) if "configMap" in v else
                       secrets.get(v["secret"]["secretName"], {}) if "secret" in v else None)
                if src is None:
                    return None
                check(key in src, f"{cname}: {what} {path} is not a key of the volume {m['name']}")
                return src.get(key)

            cmd = c.get("command", [image["binary"]]) + c.get("args", [])
            cfg = cmd[cmd.index("--config") + 1] if "--config" in cmd else "/etc/verigate/config.toml"
            config_text = file_in_mount(cfg, "--config") or ""
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                ex = c.get(probe, {}).get("exec")
                if ex:
                    pc = ex["command"]
                    check(pc[0] == image["binary"], f"{cname}: {probe} runs {pc[0]}, the image's binary is {image['binary']}")
                    if "--config" in pc:
                        check(pc[pc.index("--config") + 1] == cfg, f"{cname}: {probe} reads another config than serve")
            try:
                conf = tomllib.loads(config_text)
            except tomllib.TOMLDecodeError as e:
                check(False, f"{cname}: {cfg} is not TOML: {e}")
                conf = {}
            listen = conf.get("listen", {})
            for which, default in (("api", 8026), ("public", 8025)):
                port = int(listen.get(which, f"x:{default}").rsplit(":", 1)[1])
                check(port_ok(port, ports), f"{cname}: listen.{which} port {port} is not a containerPort")
            cenv = {e["name"]: e.get("value") for e in c.get("env", [])}
            data_dir = cenv.get("VERIGATE_DATA_DIR") or conf.get("data_dir") or image["data_dir"]
            dm = mount_of(data_dir)
            check(dm is not None and not dm.get("readOnly"), f"{cname}: data_dir {data_dir} is not a writable volume mount")
            check(data_dir == image["data_dir"] or dm is not None,
                  f"{cname}: data_dir {data_dir} differs from the image's VOLUME {image['data_dir']}")
            sc = c.get("securityContext", {})
            check(sc.get("readOnlyRootFilesystem") is True, f"{cname}: readOnlyRootFilesystem is not true")
            check(sc.get("allowPrivilegeEscalation") is False, f"{cname}: allowPrivilegeEscalation is not false")
            check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cname}: capabilities are not dropped")
            psc = pod.get("securityContext", {})
            run_as = sc.get("runAsUser", psc.get("runAsUser", image["uid"]))
            check(run_as is not None and run_as != 0, f"{cname}: runs as root")
            if "fsGroup" in psc:
                check(psc["fsGroup"] == image["uid"], f"k8s {name}: fsGroup {psc['fsGroup']} is not the image's uid/gid {image['uid']}")

            # Every *_file key of the config reads a key of a mounted Secret/ConfigMap.
            files = {}

            def walk(node, where):
                if isinstance(node, dict):
                    for k, v in node.items():
                        if k.endswith("_file") and isinstance(v, str):
                            content = file_in_mount(v, f"{where}{k}")
                            if content is not None:
                                files[v] = content
                        walk(v, f"{where}{k}.")
                elif isinstance(node, list):
                    for i, v in enumerate(node):
                        walk(v, f"{where}{i}.")
            walk(conf, "")
            # Placeholders (REPLACE_…) become real generated values so the check sees valid keys.
            for path, content in list(files.items()):
                if "REPLACE" in content:
                    base = posixpath.basename(path)
                    files[path] = {"signing-keys": generated["signing_key"], "api-key": generated["api_key"],
                                   "webhook-secret": generated["webhook_secret"]}.get(base, "placeholder-secret") + "\n"
            env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e and e["name"].startswith("VERIGATE_")}
            config_check(binary, config_text, env, files, f"{cname}: {cfg}")

        for v in volumes:
            check(v in used, f"k8s {name}: volume {v} is mounted by no container")
        ann = spec["template"].get("metadata", {}).get("annotations", {})
        if "prometheus.io/port" in ann:
            check(port_ok(int(ann["prometheus.io/port"]), all_ports),
                  f"k8s {name}: prometheus.io/port {ann['prometheus.io/port']} is no containerPort")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--build-cmd", required=True)
    a = ap.parse_args()
    binary = os.path.abspath(a.binary)
    image = check_dockerfile(os.path.join(REPO, "Dockerfile"), a.build_cmd, binary)
    check_unit(os.path.join(REPO, "systemd", "verigate.service"), binary)
    manifests = sorted(glob.glob(os.path.join(REPO, "deploy", "kubernetes", "*.yaml")) +
                       glob.glob(os.path.join(REPO, "deploy", "kubernetes", "*.yml")))
    check(bool(manifests), "no deploy/kubernetes/*.yaml")
    check_k8s(manifests, image, binary)
    print(f"== consistency checks: {passed} ok, {len(failures)} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
