"""reference/http-api.md: the routes of `cifar4 serve`, from the OpenAPI schema that FastAPI
derives from src/cifar4/serving/server.py (methods, parameters, request bodies, responses), so a
route added there appears on the page without editing it. The app is built with no runs: no
model is loaded."""

from __future__ import annotations

from typing import Any

from md import anchor, code, escape, table

METHODS = ("get", "put", "post", "delete", "patch", "head", "options")


def ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def type_of(s: dict[str, Any]) -> str:
    """A schema in a few words: `string`, `array of file`, a link to a named schema, choices."""
    if "$ref" in s:
        name = ref_name(s["$ref"])
        return f"[{escape(name)}](#{anchor(name)})"
    if "anyOf" in s or "oneOf" in s:
        alts = [a for a in s.get("anyOf", s.get("oneOf", [])) if a.get("type") != "null"]
        nullable = len(alts) < len(s.get("anyOf", s.get("oneOf", [])))
        return " or ".join(type_of(a) for a in alts) + (" or null" if nullable else "")
    if "enum" in s:
        return " \\| ".join(code(repr(v) if isinstance(v, str) else v) for v in s["enum"])
    t = s.get("type", "any")
    if t == "array":
        return f"array of {type_of(s.get('items', {}))}"
    if t == "string" and (s.get("format") == "binary" or "contentMediaType" in s):
        return "file"
    return str(t)


def properties_table(s: dict[str, Any]) -> str:
    required = set(s.get("required", []))
    rows = [[code(n), type_of(p), "yes" if n in required else "no", escape(p.get("description", ""))]
            for n, p in s.get("properties", {}).items()]
    return table(["Field", "Type", "Required", "Description"], rows)


def operation_md(path: str, method: str, op: dict[str, Any], schemas: dict[str, Any]) -> str:
    out = [f"## {method.upper()} {path}\n"]
    if op.get("summary"):
        out.append(f"**{escape(op['summary'])}**" + (" (deprecated)" if op.get("deprecated") else "") + "\n")
    if op.get("description"):
        out.append(op["description"].strip() + "\n")  # OpenAPI descriptions are Markdown already
    if op.get("security"):
        out.append("Authentication: " + ", ".join(code(n) for req in op["security"] for n in req) + ".\n")
    params = op.get("parameters", [])
    if params:
        rows = [[code(p["name"]), p.get("in", ""), "yes" if p.get("required") else "no",
                 type_of(p.get("schema", {})), escape(p.get("description", ""))] for p in params]
        out.append("Parameters:\n\n" + table(["Name", "In", "Required", "Type", "Description"], rows))
    body = op.get("requestBody")
    if body:
        for ctype, content in body.get("content", {}).items():
            schema = content.get("schema", {})
            resolved = schemas.get(ref_name(schema["$ref"]), {}) if "$ref" in schema else schema
            out.append(f"Request body ({code(ctype)}{', required' if body.get('required') else ''}):\n")
            out.append(properties_table(resolved) if resolved.get("properties") else type_of(schema) + "\n")
    rows = []
    for status, r in op.get("responses", {}).items():
        kinds = [f"{code(c)}: {type_of(v.get('schema', {}))}" for c, v in r.get("content", {}).items()]
        rows.append([code(status), escape(r.get("description", "")), "; ".join(kinds)])
    out.append("Responses:\n\n" + table(["Status", "Meaning", "Content"], rows))
    return "\n".join(out)


def render(spec: dict[str, Any]) -> str:
    info = spec.get("info", {})
    schemas = spec.get("components", {}).get("schemas", {})
    ops = [(p, m, op) for p, item in spec.get("paths", {}).items() for m, op in item.items() if m in METHODS]
    parts = ["# HTTP API\n",
             f"{escape(info.get('description', ''))} The routes of `cifar4 serve`, generated from the "
             f"server's OpenAPI schema when the site is built; a running server shows the same schema "
             f"at `/docs` and `/openapi.json`.\n",
             table(["Method", "Path", "What it does"],
                   [[m.upper(), f"[{code(p)}](#{anchor(f'{m} {p}')})", escape(op.get("summary", ""))]
                    for p, m, op in ops])]
    security = spec.get("components", {}).get("securitySchemes", {})
    if security:
        rows = [[code(n), escape(s.get("type", "")), escape(s.get("description", ""))] for n, s in security.items()]
        parts.append("Authentication schemes:\n\n" + table(["Name", "Type", "Description"], rows))
    parts += [operation_md(p, m, op, schemas) for p, m, op in ops]
    named = {n: s for n, s in schemas.items() if not n.startswith("Body_")}  # request bodies are shown inline
    if named:
        parts.append("## Schemas\n")
        for n, s in named.items():
            parts.append(f"### {n}\n")
            if s.get("description"):
                parts.append(escape(s["description"]) + "\n")
            parts.append(properties_table(s) if s.get("properties") else type_of(s) + "\n")
    return "\n".join(parts)


def main() -> str:
    from cifar4.serving.server import create_app
    return render(create_app(search=()).openapi())
