"""Run by the KServe SDK's venv (.fleet-venv): parse manifests into kserve / kubernetes models, strictly.

Each object becomes its SDK class (InferenceService, ServingRuntime), recursively through the models' own
``openapi_types`` / ``attribute_map``: an unknown or misspelled field, a wrong type or a missing required field is
an error. Prints one JSON line per object: kind, name, and what the tests check.
    .fleet-venv/bin/python tests/serve/kserve_check.py FILE.yaml…
"""
import json
import sys

import kserve
import kubernetes.client as k8s
import yaml

KINDS = {"InferenceService": "V1beta1InferenceService", "ServingRuntime": "V1alpha1ServingRuntime"}
PRIMITIVE = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def build(tname: str, data, path: str):
    tname = tname.strip()
    if tname.startswith("Dict[") or tname.startswith("dict["):  # kubernetes' newer models write typing names
        tname = "dict(" + tname[5:-1] + ")"
    if tname.startswith("List["):
        tname = "list[" + tname[5:]
    if tname.startswith("list["):
        if not isinstance(data, list):
            raise TypeError(f"{path}: expected a list, got {type(data).__name__}")
        return [build(tname[5:-1], x, f"{path}[{i}]") for i, x in enumerate(data)]
    if tname.startswith("dict("):
        if not isinstance(data, dict):
            raise TypeError(f"{path}: expected a mapping")
        inner = tname[tname.index(",") + 1:-1].strip()
        return {k: build(inner, v, f"{path}.{k}") for k, v in data.items()}
    if tname in PRIMITIVE:
        if not isinstance(data, PRIMITIVE[tname]) or (tname == "int" and isinstance(data, bool)):
            raise TypeError(f"{path}: expected {tname}, got {data!r}")
        return data
    if tname == "object":
        return data
    cls = getattr(kserve, tname, None) or getattr(k8s, tname, None)
    if cls is None:
        raise TypeError(f"{path}: unknown model type {tname}")
    if not isinstance(data, dict):
        raise TypeError(f"{path}: expected a {tname} mapping")
    rev = {v: k for k, v in cls.attribute_map.items()}
    unknown = sorted(set(data) - set(rev))
    if unknown:
        raise KeyError(f"{path}: {tname} has no field(s) {unknown}")
    return cls(**{rev[k]: build(cls.openapi_types[rev[k]], v, f"{path}.{k}") for k, v in data.items()})


def main() -> None:
    for f in sys.argv[1:]:
        with open(f) as fh:
            for obj in yaml.safe_load_all(fh):
                kind = obj.get("kind")
                if kind not in KINDS:
                    raise KeyError(f"{f}: unexpected kind {kind}")
                m = build(KINDS[kind], obj, kind)
                rec = {"file": f, "kind": kind, "name": m.metadata.name, "api_version": m.api_version}
                if kind == "InferenceService":
                    p = m.spec.predictor
                    rec.update(format=p.model.model_format.name, runtime=p.model.runtime, storage_uri=p.model.storage_uri,
                               canary=p.canary_traffic_percent, arm=(m.metadata.annotations or {}).get("quantprism/arm"))
                else:
                    rec.update(formats=[s.name for s in m.spec.supported_model_formats],
                               image=m.spec.containers[0].image)
                print(json.dumps(rec))


if __name__ == "__main__":
    main()
