// The API reference: renders /api/openapi.json (served by this binary, generated from the
// handlers) as a page. No framework, nothing fetched from elsewhere.
"use strict";

const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== null && c !== undefined) node.append(c instanceof Node ? c : String(c));
  }
  return node;
};

// Text with `code` spans, as the document's descriptions write them.
const prose = (text) => {
  const p = el("span", { class: "desc" });
  // Doc comments wrap lines; a blank line is a paragraph break.
  const flowed = String(text || "").replace(/([^\n])\n(?!\n)/g, "$1 ");
  flowed.split(/(`[^`]*`|\*\*[^*]+\*\*)/).forEach((part) => {
    if (part.startsWith("`") && part.endsWith("`") && part.length > 1) {
      p.append(el("code", {}, part.slice(1, -1)));
    } else if (part.startsWith("**") && part.endsWith("**") && part.length > 4) {
      p.append(el("strong", {}, part.slice(2, -2)));
    } else {
      p.append(part);
    }
  });
  return p;
};

const refName = (ref) => ref.split("/").pop();

// A schema as a short type: a link to a named schema, or its type.
const typeOf = (schema) => {
  if (!schema) return el("span", { class: "type" }, "any");
  if (schema.$ref) {
    const name = refName(schema.$ref);
    return el("a", { class: "type", href: `#schema-${name}` }, name);
  }
  if (schema.allOf || schema.oneOf || schema.anyOf) {
    const parts = schema.allOf || schema.oneOf || schema.anyOf;
    const span = el("span", { class: "type" });
    parts.forEach((p, i) => { if (i) span.append(schema.allOf ? " & " : " | "); span.append(typeOf(p)); });
    return span;
  }
  let t = Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type || "object";
  if (schema.type === "array" || (Array.isArray(schema.type) && schema.type.includes("array"))) {
    const span = el("span", { class: "type" }, "array of ");
    span.append(typeOf(schema.items));
    return span;
  }
  if (schema.enum) t = schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.pattern) t += ` /${schema.pattern}/`;
  return el("span", { class: "type" }, t);
};

const schemaTable = (schema) => {
  const props = schema.properties || {};
  const required = new Set(schema.required || []);
  const rows = Object.entries(props).map(([name, p]) =>
    el("tr", {}, el("td", {}, el("code", {}, name)), el("td", {}, typeOf(p)),
      el("td", {}, required.has(name) ? "required" : ""), el("td", {}, prose(p.description))));
  if (!rows.length) return typeOf(schema);
  return el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"), el("th", {}, ""),
    el("th", {}, "")), rows);
};

const security = (op, doc) => {
  const reqs = op.security === undefined ? doc.security || [] : op.security;
  if (!reqs.length) return null;
  const parts = reqs.map((r) => {
    const entries = Object.entries(r);
    if (!entries.length) return "none";
    return entries.map(([scheme, roles]) => roles.length ? `${scheme} (${roles.join(", ")})` : scheme).join(" + ");
  });
  return el("p", { class: "roles" }, el("strong", {}, "Access: "), parts.join(" or "));
};

const operation = (path, method, op, doc) => {
  const id = op.operationId || `${method}-${path}`;
  const section = el("section", { class: "op", id: `op-${id}` },
    el("h4", {}, el("span", { class: `method ${method}` }, method), path),
    op.summary ? el("p", {}, prose(op.summary)) : null,
    op.description ? el("p", {}, prose(op.description)) : null,
    security(op, doc));
  if (op.parameters && op.parameters.length) {
    section.append(el("h5", {}, "Parameters"), el("table", {},
      el("tr", {}, el("th", {}, "name"), el("th", {}, "in"), el("th", {}, "type"), el("th", {}, "")),
      op.parameters.map((p) => el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in),
        el("td", {}, typeOf(p.schema), p.required ? " (required)" : ""), el("td", {}, prose(p.description))))));
  }
  if (op.requestBody) {
    const [media, content] = Object.entries(op.requestBody.content || {})[0] || [];
    section.append(el("h5", {}, "Body ", el("span", { class: "muted" }, media || "")),
      content ? typeOf(content.schema) : "");
  }
  const responses = Object.entries(op.responses || {}).sort(([a], [b]) => a.localeCompare(b));
  section.append(el("h5", {}, "Responses"), el("table", {},
    el("tr", {}, el("th", {}, "status"), el("th", {}, "body"), el("th", {}, "headers"), el("th", {}, "")),
    responses.map(([status, r]) => {
      const [media, content] = Object.entries(r.content || {})[0] || [];
      const headers = Object.keys(r.headers || {}).map((h) => el("code", {}, h));
      const list = el("span");
      headers.forEach((h, i) => { if (i) list.append(", "); list.append(h); });
      return el("tr", {}, el("td", { class: "status" }, status),
        el("td", {}, content ? typeOf(content.schema) : "", media && media !== "application/json" ? ` ${media}` : ""),
        el("td", {}, list), el("td", {}, prose(r.description)));
    })));
  return section;
};

const render = (doc) => {
  const main = document.getElementById("doc");
  const toc = document.getElementById("toc");
  main.replaceChildren(
    el("h2", {}, `${doc.info.title} ${doc.info.version}`, el("span", { class: "muted" }, ` · OpenAPI ${doc.openapi}`)),
    el("p", {}, prose(doc.info.description)));
  toc.replaceChildren();
  const byTag = new Map((doc.tags || []).map((t) => [t.name, { tag: t, ops: [] }]));
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const method of ["get", "put", "post", "delete", "patch"]) {
      const op = item[method];
      if (!op) continue;
      const tag = (op.tags && op.tags[0]) || "other";
      if (!byTag.has(tag)) byTag.set(tag, { tag: { name: tag }, ops: [] });
      byTag.get(tag).ops.push([path, method, op]);
    }
  }
  for (const { tag, ops } of byTag.values()) {
    if (!ops.length) continue;
    main.append(el("h2", { id: `tag-${tag.name}` }, tag.name), tag.description ? el("p", {}, prose(tag.description)) : null);
    toc.append(el("h3", {}, tag.name));
    for (const [path, method, op] of ops) {
      main.append(operation(path, method, op, doc));
      toc.append(el("a", { href: `#op-${op.operationId}` }, `${method.toUpperCase()} ${path}`));
    }
  }
  const schemas = (doc.components && doc.components.schemas) || {};
  main.append(el("h2", { id: "schemas" }, "Schemas"));
  toc.append(el("h3", {}, "schemas"));
  for (const [name, schema] of Object.entries(schemas).sort(([a], [b]) => a.localeCompare(b))) {
    main.append(el("section", { class: "op", id: `schema-${name}` }, el("h4", {}, name),
      schema.description ? el("p", {}, prose(schema.description)) : null, schemaTable(schema)));
    toc.append(el("a", { href: `#schema-${name}` }, name));
  }
  const schemes = (doc.components && doc.components.securitySchemes) || {};
  main.append(el("h2", { id: "security" }, "Security schemes"), el("table", {},
    Object.entries(schemes).map(([name, s]) => el("tr", {}, el("td", {}, el("code", {}, name)),
      el("td", {}, s.type === "http" ? `HTTP ${s.scheme}` : `${s.type} in ${s.in} (${s.name})`),
      el("td", {}, prose(s.description))))));
  if (location.hash) document.getElementById(location.hash.slice(1))?.scrollIntoView();
};

fetch("/api/openapi.json")
  .then((r) => { if (!r.ok) throw new Error(`HTTP ${r.status}`); return r.json(); })
  .then(render)
  .catch((e) => {
    document.getElementById("doc").replaceChildren(el("p", {}, `Could not read /api/openapi.json: ${e.message}`));
  });
