"""Derive tests/data/kserve_inferenceservice_v1beta1.schema.json from the KServe Python SDK's models.

The SDK (pip package ``kserve``) describes every field of an InferenceService as the generated
models of the CRD's OpenAPI schema: ``V1beta1*`` classes (kserve) and the Kubernetes ``V1*``
classes they embed (kubernetes client), each with ``openapi_types`` (python name -> type) and
``attribute_map`` (python name -> JSON key). This walks them from ``V1beta1InferenceService`` and
writes a JSON Schema (draft 2020-12) with one definition per class, its JSON keys as properties,
its required fields (the kubernetes models' required pydantic fields, the kserve models' setters
that refuse None) and ``additionalProperties: false``: what ``kubectl apply --validate=strict``
does with the CRD, so a misspelt or misplaced field fails, as does a wrong type. ``status`` is left
out (the cluster writes it), ``apiVersion`` and ``kind`` are pinned.

The SDK pulls pandas, kubernetes, fastapi and uvloop and pins psutil<6, so it is not a test
dependency; the schema is derived once, in a throwaway environment, and committed:

    python -m venv /tmp/kvenv && /tmp/kvenv/bin/pip install kserve==0.21.0
    /tmp/kvenv/bin/python tests/data/make_kserve_schema.py

``--check FILE.yaml ...`` loads manifests into the SDK's models themselves (the kserve classes, and
the kubernetes client's pydantic models, which forbid unknown fields) and prints whether each
serializes back unchanged (the SDK adds ``model.name: ""`` to a Triton predictor: its default).
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path

import kserve
import kserve.models
import kubernetes
import kubernetes.client

OUT = Path(__file__).with_name("kserve_inferenceservice_v1beta1.schema.json")
SCALARS = {"str": {"type": "string"}, "int": {"type": "integer"}, "bool": {"type": "boolean"},
           "float": {"type": "number"}, "datetime": {"type": "string"}, "date": {"type": "string"}, "object": {},
           "V1Time": {"type": "string"},  # a timestamp (kserve's V1Time model has no fields)
           "ResourceQuantity": {"type": ["string", "integer", "number"]}}  # Kubernetes' int-or-string quantity


def model_class(name: str):
    # the SDK names a few Kubernetes types by their Go package: K8sIoApiAppsV1DeploymentStrategy is apps/v1's
    k8s_name = re.sub(r"^K8sIoApi[A-Z][a-z]+(V\d)", r"\1", name)
    for module, wanted in ((kserve.models, name), (kserve, name), (kubernetes.client, name), (kubernetes.client, k8s_name)):
        cls = getattr(module, wanted, None)
        if cls is not None and hasattr(cls, "openapi_types"):
            return cls
    raise KeyError(name)


def required(cls) -> set[str]:
    fields = getattr(cls, "model_fields", None)
    if fields:  # kubernetes client >= 35: pydantic models
        return {name for name, info in fields.items() if info.is_required()}
    source = inspect.getsource(cls)
    return set(re.findall(r"Invalid value for `(\w+)`, must not be `None`", source))


def type_schema(text: str, todo: list[str]) -> dict:
    text = text.strip()
    if text in SCALARS:
        return dict(SCALARS[text])
    if text.endswith("Quantity"):  # ResourceQuantity, V1beta1MetricQuantity: no model in the SDK
        return dict(SCALARS["ResourceQuantity"])
    match = re.fullmatch(r"(?:list|List)\[(.+)\]", text)
    if match:
        return {"type": "array", "items": type_schema(match.group(1), todo)}
    match = re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", text)
    if match:
        return {"type": "object", "additionalProperties": type_schema(match.group(1) or match.group(2), todo)}
    todo.append(text)
    return {"$ref": f"#/$defs/{text}"}


def main() -> None:
    defs: dict[str, dict] = {}
    todo = ["V1beta1InferenceService"]
    while todo:
        name = todo.pop()
        if name in defs:
            continue
        cls = model_class(name)
        keys = cls.attribute_map
        props = {keys[attr]: type_schema(kind, todo) for attr, kind in cls.openapi_types.items()
                 if not (name == "V1beta1InferenceService" and attr == "status")}  # the cluster writes it
        schema = {"type": "object", "properties": props, "additionalProperties": False}
        needed = sorted(keys[attr] for attr in required(cls) if attr in keys)
        if needed:
            schema["required"] = needed
        defs[name] = schema
    root = defs["V1beta1InferenceService"]
    root["properties"]["apiVersion"] = {"const": "serving.kserve.io/v1beta1"}
    root["properties"]["kind"] = {"const": "InferenceService"}
    root["required"] = ["apiVersion", "kind", "metadata", "spec"]
    used = _reachable(defs, "V1beta1InferenceService")
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
              "$comment": f"derived by tests/data/make_kserve_schema.py from the models of kserve "
                          f"{_version('kserve')} and kubernetes {kubernetes.__version__}",
              "$ref": "#/$defs/V1beta1InferenceService",
              "$defs": {name: defs[name] for name in sorted(used)}}
    OUT.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"{OUT}: {len(used)} definitions", file=sys.stderr)


def _reachable(defs: dict, start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        stack += re.findall(r'"#/\$defs/(\w+)"', json.dumps(defs[name]))
    return seen


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def load(value, kind: str):
    """``value`` as the SDK model ``kind`` (recursively); raises on an unknown field or a wrong type."""
    match = re.fullmatch(r"(?:list|List)\[(.+)\]", kind)
    if match:
        assert isinstance(value, list), (kind, value)
        return [load(v, match.group(1)) for v in value]
    match = re.fullmatch(r"dict\(str, (.+)\)|Dict\[str, (.+)\]", kind)
    if match:
        assert isinstance(value, dict), (kind, value)
        return {k: load(v, match.group(1) or match.group(2)) for k, v in value.items()}
    scalar = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}.get(kind)
    if scalar is not None:
        assert isinstance(value, scalar) and not (scalar is int and isinstance(value, bool)), (kind, value)
        return value
    cls = model_class(kind)
    if hasattr(cls, "model_validate"):
        return cls.model_validate(value)
    keys = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = set(value) - set(keys)
    assert not unknown, f"{kind}: unknown fields {sorted(unknown)}"
    return cls(**{keys[k]: load(v, cls.openapi_types[keys[k]]) for k, v in value.items()})


def check(paths: list[str]) -> None:
    import yaml

    client = kserve.ApiClient()
    for path in paths:
        document = yaml.safe_load(Path(path).read_text())
        model = load(document, "V1beta1InferenceService")
        back = json.loads(json.dumps(client.sanitize_for_serialization(model), default=str))
        model_spec = back.get("spec", {}).get("predictor", {}).get("model")
        if model_spec is not None and model_spec.get("name") == "":
            del model_spec["name"]
        print(f"{path}: {type(model).__name__}, serializes back unchanged: {back == document}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check"]:
        check(sys.argv[2:])
    else:
        main()
