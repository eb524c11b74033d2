"""Static checks of the Bicep in infra/ (issue 5), on the tree-sitter-bicep syntax tree.

- every `.bicep` file parses without ERROR or MISSING nodes;
- the function app's managed identity holds exactly the least-privilege roles, on the scopes the issue names;
- no output and no parameter default holds a secret, and Bicep never reads keys or writes secrets;
- every app setting declared in `writeback.settings.SETTINGS` is set by the Bicep, secrets only as '' or
  a Key Vault reference, and the Bicep sets no undeclared setting except the platform's own;
- the queue, storage, Key Vault, monitoring and azd wiring have the properties the issue asks for.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import tree_sitter_bicep
import yaml
from tree_sitter import Language, Node, Parser

from writeback.settings import SETTINGS, SPEC_BY_NAME

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MODULES = INFRA / "modules"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

# Built-in role definition ids (the same in every subscription), checked against Microsoft's role list.
SERVICE_BUS_DATA_RECEIVER = "4f6d3b9b-027b-4f4c-9142-0e5a2a2247e0"
SERVICE_BUS_DATA_SENDER = "69a216fc-b8fb-44d8-bc22-1f3c2cd27a39"
STORAGE_BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
STORAGE_TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
KEY_VAULT_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"
FHIR_DATA_CONTRIBUTOR = "5a1fc7df-4bf1-4951-a576-89034ee01acd"
MONITORING_METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"
KEY_VAULT_SECRETS_OFFICER = "b86a8fe4-44ce-4948-aee5-eccb2c155cd7"  # optional, for the human operator only

# Role of the function's identity -> resource type of the scope the issue asks for.
FUNCTION_ROLES = {
    SERVICE_BUS_DATA_RECEIVER: "Microsoft.ServiceBus/namespaces/queues",
    SERVICE_BUS_DATA_SENDER: "Microsoft.ServiceBus/namespaces/queues",
    STORAGE_BLOB_DATA_OWNER: "Microsoft.Storage/storageAccounts",
    STORAGE_TABLE_DATA_CONTRIBUTOR: "Microsoft.Storage/storageAccounts",
    KEY_VAULT_SECRETS_USER: "Microsoft.KeyVault/vaults",
    FHIR_DATA_CONTRIBUTOR: "Microsoft.HealthcareApis/workspaces/fhirservices",
    MONITORING_METRICS_PUBLISHER: "Microsoft.Insights/components",
}
OPERATOR_ROLES = {KEY_VAULT_SECRETS_OFFICER: "Microsoft.KeyVault/vaults"}

GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
KEY_VAULT_REFERENCE = "@Microsoft.KeyVault(SecretUri="

# App settings the Bicep may set although the code does not declare them: the platform's and SDKs' own.
PLATFORM_SETTINGS = {
    "AZURE_CLIENT_ID",
    "APPLICATIONINSIGHTS_AUTHENTICATION_STRING",
    "PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY",  # read by the Python worker
    "OTEL_PYTHON_DISABLED_INSTRUMENTATIONS",  # read by azure-monitor-opentelemetry
}
# The Functions host reads `AzureFunctionsJobHost__<path>` as an override of host.json's <path>.
HOST_JSON_OVERRIDE = "AzureFunctionsJobHost__"
BATCH_SIZE_SETTING = HOST_JSON_OVERRIDE + "extensions__serviceBus__maxMessageBatchSize"


# --- syntax tree helpers -------------------------------------------------------------------------------


@cache
def _parser() -> Parser:
    return Parser(Language(tree_sitter_bicep.language()))


@cache
def tree(path: Path) -> Node:
    return _parser().parse(path.read_bytes()).root_node


def text(node: Node) -> str:
    return (node.text or b"").decode()


def walk(node: Node) -> Iterator[Node]:
    yield node
    for child in node.children:
        yield from walk(child)


def string_value(node: Node) -> str | None:
    """The value of a string literal without interpolation, else None."""
    if node.type != "string" or any(c.type == "interpolation" for c in node.children):
        return None
    return "".join(text(c) for c in node.children if c.type in ("string_content", "escape_sequence"))


def props(obj: Node) -> dict[str, Node]:
    """Properties of an object literal: name -> value node."""
    if obj.type == "if_statement":  # conditional resource: `= if (cond) { ... }`
        obj = next(c for c in obj.children if c.type == "object")
    assert obj.type == "object", f"expected an object, got {obj.type}: {text(obj)[:80]}"
    found: dict[str, Node] = {}
    for prop in obj.children:
        if prop.type != "object_property" or prop.named_child_count < 2:
            continue
        key, value = prop.named_children[0], prop.named_children[-1]
        name = string_value(key) if key.type == "string" else text(key)
        if name is not None:
            found[name] = value
    return found


def path_get(obj: Node, *keys: str) -> Node:
    node = obj
    for key in keys:
        node = props(node)[key]
    return node


def decorator_argument(decl: Node, name: str) -> str | None:
    """The argument text of decorator `@name(...)` written just before a declaration, else None."""
    prev = decl.prev_sibling
    while prev is not None and prev.type == "comment":
        prev = prev.prev_sibling
    if prev is None or prev.type != "decorators":
        return None
    for deco in prev.named_children:
        call = deco.named_children[0]
        if call.type == "call_expression" and text(call.named_children[0]) == name:
            return text(call.named_children[1]).strip("()").strip()
    return None


def decorators_of(decl: Node) -> list[str]:
    """Decorator names (`secure`, `description`, ...) written just before a declaration."""
    prev = decl.prev_sibling
    while prev is not None and prev.type == "comment":
        prev = prev.prev_sibling
    if prev is None or prev.type != "decorators":
        return []
    names = []
    for deco in prev.named_children:
        call = deco.named_children[0]
        head = call.named_children[0] if call.type == "call_expression" else call
        names.append(text(head))
    return names


@dataclass(frozen=True)
class Declaration:
    path: Path
    kind: str  # param | var | resource | module | output
    name: str
    node: Node  # the declaration
    value: Node | None  # value / body / default

    @property
    def type_string(self) -> str:
        """Resource type with API version, or module path."""
        return string_value(self.node.named_children[1]) or ""

    @property
    def resource_type(self) -> str:
        return self.type_string.split("@")[0]


def declarations(path: Path) -> list[Declaration]:
    kinds = {
        "parameter_declaration": "param",
        "variable_declaration": "var",
        "resource_declaration": "resource",
        "module_declaration": "module",
        "output_declaration": "output",
    }
    found = []
    for node in walk(tree(path)):
        kind = kinds.get(node.type)
        if kind is None:
            continue
        name = text(node.named_children[0])
        after_equals = False
        value = None
        for child in node.children:
            if after_equals and child.is_named:
                value = child
                break
            after_equals = after_equals or child.type == "="
        found.append(Declaration(path, kind, name, node, value))
    return found


def declared(path: Path, kind: str) -> dict[str, Declaration]:
    return {d.name: d for d in declarations(path) if d.kind == kind}


def resources(path: Path) -> list[Declaration]:
    return [d for d in declarations(path) if d.kind == "resource"]


def resolve_guids(node: Node, variables: dict[str, Declaration]) -> set[str]:
    """Role GUIDs an expression evaluates to, following `var` references and `var.property` lookups."""
    guids = set(GUID.findall(text(node)))
    if node.type == "member_expression":
        base, member = node.named_children[0], node.named_children[-1]
        var = variables.get(text(base))
        if var is not None and var.value is not None and var.value.type == "object":
            return guids | resolve_guids(props(var.value)[text(member)], variables)
    if node.type == "identifier" and text(node) in variables:
        value = variables[text(node)].value
        return guids | (resolve_guids(value, variables) if value is not None else set())
    for child in node.named_children:
        guids |= resolve_guids(child, variables)
    return guids


def module_call(module_path: str) -> Declaration:
    """The `module` declaration of main.bicep that deploys infra/<module_path>."""
    calls = [d for d in declarations(INFRA / "main.bicep") if d.kind == "module" and d.type_string == module_path]
    assert len(calls) == 1, f"main.bicep must deploy {module_path} exactly once"
    return calls[0]


@dataclass(frozen=True)
class RoleAssignment:
    path: Path
    name: str
    role_ids: frozenset[str]
    scope_type: str
    principal: str
    principal_type: str


def role_assignments() -> list[RoleAssignment]:
    found = []
    for path in BICEP_FILES:
        variables = declared(path, "var")
        by_symbol = {d.name: d for d in resources(path)}
        for res in resources(path):
            if res.resource_type != "Microsoft.Authorization/roleAssignments":
                continue
            assert res.value is not None
            body = props(res.value)
            assert "scope" in body, f"{path.name}:{res.name} has no explicit scope (resource group scope is too broad)"
            scope_symbol = text(body["scope"])
            assert scope_symbol in by_symbol, f"{path.name}:{res.name} must be scoped to a resource symbol"
            properties = props(body["properties"])
            found.append(
                RoleAssignment(
                    path=path,
                    name=res.name,
                    role_ids=frozenset(resolve_guids(properties["roleDefinitionId"], variables)),
                    scope_type=by_symbol[scope_symbol].resource_type,
                    principal=text(properties["principalId"]),
                    principal_type=string_value(properties["principalType"]) or text(properties["principalType"]),
                )
            )
    return found


def app_settings() -> dict[str, Node]:
    """The function app's settings object (functionapp.bicep `var appSettings`)."""
    var = declared(MODULES / "functionapp.bicep", "var")["appSettings"]
    assert var.value is not None
    return props(var.value)


# --- parsing ---------------------------------------------------------------------------------------------


def test_expected_bicep_files_exist():
    names = {p.relative_to(INFRA).as_posix() for p in BICEP_FILES}
    assert "main.bicep" in names
    for module in ("monitoring", "servicebus", "storage", "keyvault", "functionapp", "roles", "fhir-role"):
        assert f"modules/{module}.bicep" in names


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_bicep_parses_without_errors(path: Path):
    root = tree(path)
    bad = [
        f"{node.type}{' (missing)' if node.is_missing else ''} at line {node.start_point[0] + 1}: "
        f"{text(node)[:60]!r}"
        for node in walk(root)
        if node.type == "ERROR" or node.is_missing
    ]
    assert not bad, f"{path.name}: " + "; ".join(bad)
    assert not root.has_error


def test_every_module_path_exists():
    for path in BICEP_FILES:
        for mod in declarations(path):
            if mod.kind == "module":
                assert (path.parent / mod.type_string).is_file(), f"{path.name}: {mod.type_string} not found"


# --- role assignments --------------------------------------------------------------------------------------


def test_role_assignments_each_name_one_known_role():
    for ra in role_assignments():
        assert len(ra.role_ids) == 1, f"{ra.path.name}:{ra.name} roles {set(ra.role_ids)}"
        assert ra.role_ids <= FUNCTION_ROLES.keys() | OPERATOR_ROLES.keys(), (
            f"{ra.path.name}:{ra.name} assigns a role outside the least-privilege set: {set(ra.role_ids)}"
        )


@pytest.mark.parametrize("role_id", FUNCTION_ROLES, ids=lambda r: r[:8])
def test_function_identity_holds_role_on_expected_scope(role_id: str):
    matches = [ra for ra in role_assignments() if role_id in ra.role_ids]
    assert len(matches) == 1, f"role {role_id} must be assigned exactly once, found {len(matches)}"
    ra = matches[0]
    assert ra.scope_type == FUNCTION_ROLES[role_id], f"{ra.name} scoped to {ra.scope_type}"
    assert ra.principal == "principalId" and ra.principal_type == "ServicePrincipal"
    # ...and that principal is the function app's identity, wired in main.bicep.
    module = "modules/fhir-role.bicep" if ra.path.name == "fhir-role.bicep" else f"modules/{ra.path.name}"
    call = module_call(module)
    assert call.value is not None
    assert text(path_get(call.value, "params", "principalId")) == "identity.outputs.principalId"


def test_operator_role_is_optional_and_on_the_vault_only():
    (officer,) = [ra for ra in role_assignments() if KEY_VAULT_SECRETS_OFFICER in ra.role_ids]
    assert officer.scope_type == "Microsoft.KeyVault/vaults"
    res = declared(officer.path, "resource")[officer.name]
    assert res.value is not None and res.value.type == "if_statement", "operator role must be conditional"


def test_function_app_runs_as_that_identity():
    call = module_call("modules/functionapp.bicep")
    assert call.value is not None
    assert text(path_get(call.value, "params", "identityId")) == "identity.outputs.id"
    assert text(path_get(call.value, "params", "identityClientId")) == "identity.outputs.clientId"
    site = next(r for r in resources(MODULES / "functionapp.bicep") if r.resource_type == "Microsoft.Web/sites")
    assert site.value is not None
    assert string_value(path_get(site.value, "identity", "type")) == "UserAssigned"
    assert text(path_get(site.value, "properties", "keyVaultReferenceIdentity")) == "identityId"
    # The roles must exist before the host first starts.
    depends = text(props(call.value)["dependsOn"])
    assert "roles" in depends and "fhirRole" in depends


def test_fhir_role_is_granted_on_the_existing_fhir_service():
    call = module_call("modules/fhir-role.bicep")
    assert call.value is not None
    scope = text(props(call.value)["scope"])
    assert scope.replace(" ", "") == "resourceGroup(fhirSubscriptionId,fhirResourceGroupName)"
    fhir = [r for r in resources(MODULES / "fhir-role.bicep") if r.resource_type.startswith("Microsoft.HealthcareApis")]
    assert fhir and all(text(r.node).find(" existing ") > 0 for r in fhir), "the FHIR service must be `existing`"
    params = declared(INFRA / "main.bicep", "param")
    assert "fhirServiceResourceId" in params and params["fhirServiceResourceId"].value is None


# --- secrets ------------------------------------------------------------------------------------------------

SECRET_WORDS = re.compile(r"secret|password|connectionstring|sas|accountkey|primarykey|instrumentationkey", re.I)
SECRET_EXPRESSIONS = re.compile(
    r"\blist\w*\s*\(|connectionstring|primarykey|secondarykey|instrumentationkey|\.keys\b|getsecret\s*\(", re.I
)


def test_no_output_holds_a_secret():
    outputs = [d for path in BICEP_FILES for d in declarations(path) if d.kind == "output"]
    assert outputs
    for out in outputs:
        assert not SECRET_WORDS.search(out.name), f"{out.path.name}: output {out.name}"
        assert out.value is not None
        assert not SECRET_EXPRESSIONS.search(text(out.value)), f"{out.path.name}: output {out.name}"
        assert "secure" not in decorators_of(out.node)


def test_secure_parameters_have_no_default_and_secret_names_are_secure():
    for path in BICEP_FILES:
        for param in declared(path, "param").values():
            secure = "secure" in decorators_of(param.node)
            if secure:
                assert param.value is None, f"{path.name}: @secure() param {param.name} has a default"
            # A parameter carrying a secret (not the *name* of a secret) must be @secure() without default.
            if re.search(r"(secret|password|key|connectionstring)$", param.name, re.I):
                assert secure and param.value is None, f"{path.name}: param {param.name} must be @secure()"


def test_no_parameter_default_looks_like_a_credential():
    credential = re.compile(r"accountkey=|sharedaccesskey=|password=|client_secret|-----begin", re.I)
    for path in BICEP_FILES:
        for param in declared(path, "param").values():
            if param.value is not None:
                assert not credential.search(text(param.value)), f"{path.name}: param {param.name}"


def test_bicep_never_reads_keys_nor_writes_secrets():
    for path in BICEP_FILES:
        for node in walk(tree(path)):
            if node.type == "call_expression":
                func = text(node.named_children[0])
                assert not func.startswith("list"), f"{path.name}: {func}() exposes keys"
                assert func != "getSecret", f"{path.name}: getSecret() passes a secret through Bicep"
        for res in resources(path):
            assert res.resource_type != "Microsoft.KeyVault/vaults/secrets", "the operator stores secrets, not Bicep"
            assert "authorizationRules" not in res.resource_type or res.resource_type.endswith(
                "queues/authorizationRules"
            ), f"{path.name}: {res.resource_type} (only a queue-level rule is allowed)"


def test_main_parameters_hold_no_secret():
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    for name in parameters:
        assert not re.search(r"(secret|password|key|connectionstring)$", name, re.I), name


# --- app settings: one source of truth -----------------------------------------------------------------------


def _is_secret_safe(value: Node, variables: dict[str, Declaration]) -> bool:
    """'' or a Key Vault reference (directly, via a var, or as both branches of a ternary)."""
    if value.type == "string":
        literal = string_value(value)
        return literal == "" or text(value).startswith("'" + KEY_VAULT_REFERENCE)
    if value.type == "ternary_expression":
        branches = value.named_children[1:]
        return len(branches) == 2 and all(_is_secret_safe(b, variables) for b in branches)
    if value.type == "identifier" and text(value) in variables:
        var_value = variables[text(value)].value
        return var_value is not None and _is_secret_safe(var_value, variables)
    return False


def site_only_settings() -> set[str]:
    """Settings the site appends to `appSettingsList` itself: values read from a resource at deployment time
    (the Application Insights connection string), which the `appSettings` object cannot hold."""
    site = _resource(MODULES / "functionapp.bicep", "Microsoft.Web/sites")
    listed = text(path_get(site, "properties", "siteConfig", "appSettings"))
    return set(re.findall(r"name:\s*'([^']+)'", listed))


def test_every_declared_setting_is_set_by_bicep():
    settings = app_settings()
    missing = []
    for spec in SETTINGS:
        if spec.name in settings or spec.name in site_only_settings():
            continue
        # A host connection (e.g. AzureWebJobsStorage) is set in its identity-based form `<name>__<property>`.
        if spec.host_only and any(name.startswith(spec.name + "__") for name in settings):
            continue
        missing.append(spec.name)
    assert not missing, f"app settings missing from infra/modules/functionapp.bicep: {missing}"


def test_runtime_storage_is_identity_based():
    settings = app_settings()
    assert "AzureWebJobsStorage" not in settings, "a connection string would need shared-key access"
    assert "AzureWebJobsStorage__accountName" in settings
    assert string_value(settings["AzureWebJobsStorage__credential"]) == "managedidentity"
    assert string_value(settings["ServiceBusConnection__credential"]) == "managedidentity"
    assert text(settings["ServiceBusConnection__fullyQualifiedNamespace"]) == "serviceBusFullyQualifiedNamespace"
    assert text(settings["OUTCOMES_TABLE_ENDPOINT"]) == "tableEndpoint"
    assert string_value(settings["OUTCOMES_CONNECTION_STRING"]) == ""


def test_bicep_sets_no_undeclared_setting():
    declared_names = {s.name for s in SETTINGS}
    prefixes = (*(s.name.split("__")[0] + "__" for s in SETTINGS if s.host_only), HOST_JSON_OVERRIDE)
    extra = [
        name
        for name in app_settings()
        if name not in declared_names and name not in PLATFORM_SETTINGS and not name.startswith(prefixes)
    ]
    assert not extra, f"settings not declared in writeback/settings.py (typo?): {extra}"


def test_batch_size_is_a_parameter_defaulting_to_host_json():
    """Messages per invocation of the batch trigger: one parameter from main.bicep to the host.json override."""
    host = json.loads((ROOT / "host.json").read_text())["extensions"]["serviceBus"]["maxMessageBatchSize"]
    assert text(app_settings()[BATCH_SIZE_SETTING]) == "string(maxMessageBatchSize)"
    call = module_call("modules/functionapp.bicep")
    assert call.value is not None
    assert text(path_get(call.value, "params", "maxMessageBatchSize")) == "maxMessageBatchSize"
    for path in (INFRA / "main.bicep", MODULES / "functionapp.bicep"):
        param = declared(path, "param")["maxMessageBatchSize"]
        assert param.value is not None and int(text(param.value)) == host, f"{path.name}: default is not {host}"
        assert {"minValue", "maxValue"} <= set(decorators_of(param.node)), f"{path.name}: unbounded"


def test_secret_settings_are_empty_or_key_vault_references():
    settings = app_settings()
    variables = declared(MODULES / "functionapp.bicep", "var")
    for spec in SETTINGS:
        if spec.secret and spec.name in settings:
            assert _is_secret_safe(settings[spec.name], variables), (
                f"{spec.name} must be '' or {KEY_VAULT_REFERENCE}...), got {text(settings[spec.name])}"
            )
    # The alternate endpoint's secret is a real reference when that target is chosen.
    reference = variables["alternateClientSecretReference"].value
    assert reference is not None and text(reference).startswith("'" + KEY_VAULT_REFERENCE)


def test_site_uses_the_settings_object():
    path = MODULES / "functionapp.bicep"
    variables = declared(path, "var")
    settings_list = variables["appSettingsList"].value
    assert settings_list is not None and "union(appSettings, appSettingOverrides)" in text(settings_list)
    site = next(r for r in resources(path) if r.resource_type == "Microsoft.Web/sites")
    assert site.value is not None
    assert "appSettingsList" in text(path_get(site.value, "properties", "siteConfig", "appSettings"))


# --- resources the issue specifies -------------------------------------------------------------------------------


def _resource(path: Path, resource_type: str) -> Node:
    matches = [r for r in resources(path) if r.resource_type == resource_type]
    assert len(matches) == 1, f"{path.name}: expected one {resource_type}"
    assert matches[0].value is not None
    return matches[0].value


def test_queue_settings():
    path = MODULES / "servicebus.bicep"
    queue = props(path_get(_resource(path, "Microsoft.ServiceBus/namespaces/queues"), "properties"))
    for key in ("maxDeliveryCount", "lockDuration", "duplicateDetectionHistoryTimeWindow", "defaultMessageTimeToLive"):
        assert key in queue
    assert text(queue["deadLetteringOnMessageExpiration"]) == "true"
    assert text(queue["requiresDuplicateDetection"]) == "true"
    rule = _resource(path, "Microsoft.ServiceBus/namespaces/queues/authorizationRules")
    rights = path_get(rule, "properties", "rights")
    assert [string_value(r) for r in rights.named_children] == ["Send"], "the Dataverse SAS rule is send-only"
    namespace = props(path_get(_resource(path, "Microsoft.ServiceBus/namespaces"), "properties"))
    assert string_value(namespace["minimumTlsVersion"]) == "1.2"


def test_storage_posture():
    account = props(path_get(_resource(MODULES / "storage.bicep", "Microsoft.Storage/storageAccounts"), "properties"))
    assert text(account["supportsHttpsTrafficOnly"]) == "true"
    assert string_value(account["minimumTlsVersion"]) == "TLS1_2"
    assert text(account["allowBlobPublicAccess"]) == "false"
    assert text(account["allowSharedKeyAccess"]) == "false"


def test_key_vault_uses_rbac():
    vault = props(path_get(_resource(MODULES / "keyvault.bicep", "Microsoft.KeyVault/vaults"), "properties"))
    assert text(vault["enableRbacAuthorization"]) == "true"
    assert text(vault["enablePurgeProtection"]) == "true"


def test_monitoring_and_alerts():
    insights = _resource(MODULES / "monitoring.bicep", "Microsoft.Insights/components")
    assert text(path_get(insights, "properties", "DisableLocalAuth")) == "true"
    assert "WorkspaceResourceId" in props(path_get(insights, "properties"))
    alerts = [r for r in resources(MODULES / "alerts.bicep") if r.resource_type == "Microsoft.Insights/metricAlerts"]
    metrics = {}
    for alert in alerts:
        assert alert.value is not None
        (criterion,) = path_get(alert.value, "properties", "criteria", "allOf").named_children
        c = props(criterion)
        metrics[string_value(c["metricName"])] = (string_value(c["operator"]), text(c["threshold"]))
    # Messages the broker dead-lettered itself (deliveries exhausted, expired) never reach the code: the metric.
    assert metrics == {"DeadletteredMessages": ("GreaterThan", "0")}, (
        "the handler catches every error, so a failed-requests/executions alert could never fire"
    )


def outcome_alert_queries() -> dict[str, str]:
    """Resource symbol → KQL of each log alert rule in alerts.bicep."""
    found = {}
    for rule in resources(MODULES / "alerts.bicep"):
        if rule.resource_type != "Microsoft.Insights/scheduledQueryRules":
            continue
        assert rule.value is not None
        (criterion,) = path_get(rule.value, "properties", "criteria", "allOf").named_children
        query = string_value(props(criterion)["query"])
        assert query is not None, f"{rule.name}: the query must be a literal (tests/telemetry checks its fields)"
        found[rule.name] = query
    return found


@pytest.mark.parametrize("outcome", ["dead-lettered", "config-error"])
def test_an_outcome_alert_fires_on_the_first_such_outcome(outcome: str):
    """Log alerts on the function's own outcome records (OpenTelemetry traces, customDimensions), on the
    Application Insights component, notifying the optional action group."""
    rules = {r.name: r for r in resources(MODULES / "alerts.bicep")}
    matches = [name for name, query in outcome_alert_queries().items()
               if f'tostring(customDimensions["outcome"]) == "{outcome}"' in query]
    assert len(matches) == 1, f"one log alert must fire on outcome {outcome}"
    rule = rules[matches[0]].value
    assert rule is not None
    properties = props(path_get(rule, "properties"))
    assert text(properties["scopes"]).replace(" ", "").replace("\n", "") == "[applicationInsightsId]"
    assert text(properties["enabled"]) == "true"
    (criterion,) = path_get(rule, "properties", "criteria", "allOf").named_children
    c = props(criterion)
    assert string_value(c["operator"]) == "GreaterThan" and text(c["threshold"]) == "0"
    assert string_value(c["timeAggregation"]) == "Count"
    assert text(properties["actions"]) == "logActions"
    actions = declared(MODULES / "alerts.bicep", "var")["logActions"].value
    assert actions is not None and "actionGroup.id" in text(actions)
    assert string_value(properties["windowSize"]) == "PT15M"
    # the rule runs where the component is
    assert text(props(rule)["location"]) == "location"
    call = module_call("modules/alerts.bicep")
    assert call.value is not None
    assert text(path_get(call.value, "params", "location")) == "location"
    assert text(path_get(call.value, "params", "applicationInsightsId")) == "monitoring.outputs.applicationInsightsId"


def test_flex_consumption_python_app():
    path = MODULES / "functionapp.bicep"
    plan = _resource(path, "Microsoft.Web/serverfarms")
    assert string_value(path_get(plan, "sku", "name")) == "FC1"
    assert string_value(path_get(plan, "sku", "tier")) == "FlexConsumption"
    site = _resource(path, "Microsoft.Web/sites")
    runtime = path_get(site, "properties", "functionAppConfig", "runtime")
    assert string_value(props(runtime)["name"]) == "python"
    assert text(props(runtime)["version"]) == "pythonVersion"
    for file in (path, INFRA / "main.bicep"):
        param = declared(file, "param")["pythonVersion"]
        assert param.value is not None and string_value(param.value) == "3.11", f"{file.name}: default"
        allowed = decorator_argument(param.node, "allowed")
        assert allowed is not None and re.findall(r"'([^']*)'", allowed) == ["3.11", "3.12", "3.13"], (
            f"{file.name}: Flex Consumption offers Python 3.11 to 3.13 for new apps"
        )
    call = module_call("modules/functionapp.bicep")
    assert call.value is not None
    assert text(path_get(call.value, "params", "pythonVersion")) == "pythonVersion"
    assert text(path_get(site, "properties", "httpsOnly")) == "true"
    auth = path_get(site, "properties", "functionAppConfig", "deployment", "storage", "authentication")
    assert string_value(props(auth)["type"]) == "UserAssignedIdentity"


# --- azd -------------------------------------------------------------------------------------------------------------


def test_azure_yaml_deploys_the_repository_root_as_a_python_function():
    project = yaml.safe_load((ROOT / "azure.yaml").read_text())
    service = project["services"]["writeback"]
    assert service == {"project": ".", "language": "python", "host": "function"}
    # azd finds the app by its azd-service-name tag.
    default = declared(MODULES / "functionapp.bicep", "param")["azdServiceName"].value
    assert default is not None and string_value(default) == "writeback"


def test_parameters_file_matches_main_bicep():
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert parameters["environmentName"]["value"] == "${AZURE_ENV_NAME}"
    assert parameters["location"]["value"] == "${AZURE_LOCATION}"
    assert "fhirServiceResourceId" in parameters
    main_params = declared(INFRA / "main.bicep", "param")
    assert set(parameters) <= set(main_params), set(parameters) - set(main_params)
    required = {name for name, p in main_params.items() if p.value is None}
    assert required <= set(parameters), f"required parameters missing from main.parameters.json: {required}"


# --- timing and telemetry settings (issue 13) ---------------------------------------------------------------------


def test_one_lock_duration_parameter_sets_the_queue_and_the_app_setting():
    """The queue's lock and the app's WRITEBACK_LOCK_DURATION_SECONDS (from which each invocation derives its
    deadline) come from one integer parameter, at most Service Bus's 300 s; its default is the setting's."""
    setting_default = int(SPEC_BY_NAME["WRITEBACK_LOCK_DURATION_SECONDS"].default or 0)
    for path in (INFRA / "main.bicep", MODULES / "servicebus.bicep", MODULES / "functionapp.bicep"):
        params = declared(path, "param")
        assert "lockDuration" not in params, f"{path.name}: the ISO 8601 lockDuration parameter is gone"
        param = params["lockDurationSeconds"]
        assert "int" in text(param.node).split("=")[0], f"{path.name}: lockDurationSeconds must be an int"
        assert param.value is not None and int(text(param.value)) == setting_default == 300
        assert decorator_argument(param.node, "maxValue") == "300", f"{path.name}: Service Bus allows at most PT5M"
        assert decorator_argument(param.node, "minValue") is not None
    for module in ("modules/servicebus.bicep", "modules/functionapp.bicep"):
        call = module_call(module)
        assert call.value is not None
        assert text(path_get(call.value, "params", "lockDurationSeconds")) == "lockDurationSeconds", module
    queue = _resource(MODULES / "servicebus.bicep", "Microsoft.ServiceBus/namespaces/queues")
    assert text(path_get(queue, "properties", "lockDuration")) == "'PT${lockDurationSeconds}S'"
    assert text(app_settings()["WRITEBACK_LOCK_DURATION_SECONDS"]) == "string(lockDurationSeconds)"


def test_servicebus_comment_does_not_promise_lock_renewal():
    source = (MODULES / "servicebus.bicep").read_text()
    assert "renews the lock" not in source
    assert "NOT renew the locks of a batch trigger" in source


def test_app_exports_opentelemetry_with_the_managed_identity():
    """The worker configures the Azure Monitor distro (PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY), which
    authenticates with the app's identity (APPLICATIONINSIGHTS_AUTHENTICATION_STRING); the instrumentations
    switched off are the ones writeback.telemetry switches off when it configures the distro itself."""
    from writeback.telemetry import DISABLED_INSTRUMENTATIONS

    settings = app_settings()
    assert string_value(settings["PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY"]) == "true"
    assert text(settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"]) == (
        "'ClientId=${identityClientId};Authorization=AAD'"
    )
    disabled = string_value(settings["OTEL_PYTHON_DISABLED_INSTRUMENTATIONS"])
    assert disabled is not None and disabled.split(",") == list(DISABLED_INSTRUMENTATIONS)
    assert string_value(settings["PYTHON_ISOLATE_WORKER_DEPENDENCIES"]) == "1"
    # The connection string is read from the component at deployment, never passed through an output.
    site = _resource(MODULES / "functionapp.bicep", "Microsoft.Web/sites")
    assert "appInsights.properties.ConnectionString" in text(path_get(site, "properties", "siteConfig", "appSettings"))


def test_sender_role_says_why_it_is_kept():
    # (Not for `resubmit`: it runs under the administrator's own sign-in; a managed identity is the app's alone.)
    why = "scheduling retries of transient failures on the same queue (`resubmit` and `discard` run under the " \
        "administrator's own sign-in"
    readme = (INFRA / "README.md").read_text()
    row = next(line for line in readme.splitlines() if SERVICE_BUS_DATA_SENDER in line)
    assert why in row
    roles_source = (MODULES / "roles.bicep").read_text()
    assert "schedule retries of transient failures" in roles_source
