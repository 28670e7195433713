"""The deployment files under infra/ fit each other and the code.

CI has no Docker engine and no cloud. cfn-lint (the template against CloudFormation's schemas)
and hadolint (Dockerfile practice) run in .ci/run; these tests check what neither linter knows:
the notification -> queue -> dead-letter wiring, timeouts derived from the processing timeout,
suffix filters that cannot match the handler's own outputs (computed with the real
``S3Storage``), least-privilege IAM, and that every command and ``PAIRWATCH_*`` variable a
container is given exists in the real CLI and ``Settings``. The last test deploys the GPU stack
on moto and runs the task definition's command against it.
"""

from __future__ import annotations

import fnmatch
import importlib
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cfnlint.decode import decode_str

from handler.config import ComparisonConfig, Settings
from handler.pairs import IMAGE_SUFFIXES, MANIFEST_SUFFIX, is_output_name, is_relevant_name
from handler.s3_storage import S3Storage
from tests.support import scenes
from tests.support.s3_servers import aws_env, client, moto_server, unique, wait_for
from watcher.cli import _normalise_argv, build_parser
from watcher.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
TEMPLATE = INFRA / "aws" / "template.yaml"
COMPOSE = INFRA / "minio" / "docker-compose.yml"
GPU_DOCKERFILE = INFRA / "docker" / "gpu.Dockerfile"
LAMBDA_DOCKERFILE = INFRA / "docker" / "lambda.Dockerfile"

#: Every key a notification must cover: S3 and MinIO suffix filters are literal and
#: case-sensitive, so each suffix is listed in lower and upper case.
EXPECTED_SUFFIXES = {
    variant for suffix in (*IMAGE_SUFFIXES, MANIFEST_SUFFIX) for variant in (suffix, suffix.upper())
}
#: The handler's own outputs for a pair folder and for a manifest.
OUTPUT_NAMES = ("pair-1/result.json", "pair-1/diff.png", "m.result.json", "m.diff.png")
FAKE_QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/pairwatch-JobQueue"


# ------------------------------------------------------------------ a small template evaluator


@dataclass(frozen=True)
class Ref:
    """``!Ref`` of a resource (parameters resolve to their values)."""

    name: str


@dataclass(frozen=True)
class GetAtt:
    name: str
    attribute: str


_NO_VALUE = object()
_PSEUDO = {
    "AWS::Partition": "aws",
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "AWS::StackName": "pairwatch",
}


class Stack:
    """The template as CloudFormation would see it for one set of parameter values.

    Evaluates just the intrinsic functions the template uses; anything else fails loudly.
    """

    def __init__(self, template: dict[str, Any], **overrides: Any) -> None:
        self.template = template
        values = {"BucketName": "example-bucket", "ImageUri": "example/image:1"}
        values |= {
            name: spec["Default"]
            for name, spec in template["Parameters"].items()
            if "Default" in spec
        }
        values |= overrides
        self.params = {name: _param_value(template, name, v) for name, v in values.items()}

    def condition(self, name: str) -> bool:
        return bool(self._condition(self.template["Conditions"][name]))

    def _condition(self, node: Any) -> Any:
        if isinstance(node, dict) and len(node) == 1:
            (fn, arg), *_ = node.items()
            if fn == "Fn::Equals":
                return self.resolve(arg[0]) == self.resolve(arg[1])
            if fn == "Fn::Not":
                return not self._condition(arg[0])
            if fn == "Condition":
                return self.condition(arg)
        return self.resolve(node)

    def resolve(self, node: Any) -> Any:
        if isinstance(node, dict):
            if len(node) == 1:
                (fn, arg), *_ = node.items()
                if fn == "Ref":
                    return self._ref(arg)
                if fn == "Fn::GetAtt":
                    name, attribute = arg.split(".", 1) if isinstance(arg, str) else arg
                    return GetAtt(name, attribute)
                if fn == "Fn::Sub":
                    return self._sub(arg)
                if fn == "Fn::FindInMap":
                    table, key, field = (str(self.resolve(part)) for part in arg)
                    return self.template["Mappings"][table][key][field]
                if fn == "Fn::If":
                    return self.resolve(arg[1] if self.condition(arg[0]) else arg[2])
                if fn == "Fn::Base64":
                    return self.resolve(arg)
                assert not fn.startswith("Fn::"), f"evaluator lacks {fn}"
            resolved = {key: self.resolve(value) for key, value in node.items()}
            return {key: value for key, value in resolved.items() if value is not _NO_VALUE}
        if isinstance(node, list):
            items = [self.resolve(item) for item in node]
            return [item for item in items if item is not _NO_VALUE]
        return node

    def _ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return _NO_VALUE
        if name in _PSEUDO:
            return _PSEUDO[name]
        if name in self.params:
            return self.params[name]
        assert name in self.template["Resources"], f"Ref to unknown {name}"
        return Ref(name)

    def _sub(self, arg: Any) -> str:
        text, local = (arg, {}) if isinstance(arg, str) else (arg[0], arg[1])

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name in local:
                return str(self.resolve(local[name]))
            if "." in name:
                return f"<{name}>"
            value = self._ref(name)
            return f"<{value.name}>" if isinstance(value, Ref) else str(value)

        return re.sub(r"\$\{([^}!]+)\}", replace, text)

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        """Resources that exist for these parameters, with resolved properties."""
        return {
            name: {"Type": spec["Type"], **self.resolve(spec.get("Properties", {}))}
            for name, spec in self.template["Resources"].items()
            if "Condition" not in spec or self.condition(spec["Condition"])
        }

    def of_type(self, type_name: str) -> dict[str, dict[str, Any]]:
        return {n: r for n, r in self.resources.items() if r["Type"] == type_name}


def _param_value(template: dict[str, Any], name: str, value: Any) -> Any:
    if template["Parameters"][name]["Type"] == "CommaDelimitedList":
        return str(value).split(",")
    return str(value)  # CloudFormation hands every parameter over as a string


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    decoded, errors = decode_str(TEMPLATE.read_text(encoding="utf-8"))
    assert not errors, errors
    return decoded


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def _allowed(template: dict[str, Any], name: str) -> list[str]:
    return [str(v) for v in template["Parameters"][name]["AllowedValues"]]


# ------------------------------------------------------------------ bucket -> queue -> DLQ


def _notification_rules(stack: Stack) -> list[tuple[str, str]]:
    bucket = stack.resources["Bucket"]
    rules = []
    for config in bucket["NotificationConfiguration"]["QueueConfigurations"]:
        assert config["Queue"] == GetAtt("JobQueue", "Arn")
        assert config["Event"] == "s3:ObjectCreated:*"
        by_name = {rule["Name"]: rule["Value"] for rule in config["Filter"]["S3Key"]["Rules"]}
        assert set(by_name) == {"prefix", "suffix"}
        rules.append((by_name["prefix"], by_name["suffix"]))
    return rules


def _notified(rules: list[tuple[str, str]], key: str) -> bool:
    return any(key.startswith(prefix) and key.endswith(suffix) for prefix, suffix in rules)


@pytest.mark.parametrize(
    ("input_prefix", "output_prefix"), [("incoming/", "results/"), ("a/in/", "a/out/")]
)
def test_notifications_cover_inputs_and_never_the_handlers_outputs(
    template: dict[str, Any], input_prefix: str, output_prefix: str
) -> None:
    stack = Stack(template, InputPrefix=input_prefix, OutputPrefix=output_prefix)
    rules = _notification_rules(stack)
    assert {prefix for prefix, _ in rules} == {input_prefix}
    suffixes = [suffix for _, suffix in rules]
    assert sorted(suffixes) == sorted(EXPECTED_SUFFIXES)
    # S3 refuses overlapping rules on one prefix (one suffix ending with another).
    for a in suffixes:
        assert not any(b != a and a.endswith(b) for b in suffixes), a

    for suffix in suffixes:
        key = f"{input_prefix}pair-1/photo{suffix}"
        assert _notified(rules, key) and is_relevant_name(key)

    # Where the handler really writes its outputs: the S3 storage's own addressing.
    storage = S3Storage(None, "example-bucket", "", output_prefix=output_prefix)  # type: ignore[arg-type]
    for name in OUTPUT_NAMES:
        bucket, key = storage.location(input_prefix + name)
        assert key.startswith(output_prefix), key
        assert not _notified(rules, key), f"{key} would re-trigger the handler"
        assert storage.is_own_output(bucket, key)  # and the handler would drop it anyway
    # The suffixes alone already exclude results; diff images rely on the prefix as shown above.
    for name in OUTPUT_NAMES:
        assert is_output_name(name)
        by_suffix = any(name.endswith(suffix) for suffix in suffixes)
        assert by_suffix == name.endswith(".png"), name


def test_queue_redrives_to_the_dead_letter_queue_after_three_receives(
    template: dict[str, Any],
) -> None:
    resources = Stack(template).resources
    redrive = resources["JobQueue"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == GetAtt("DeadLetterQueue", "Arn")
    assert int(redrive["maxReceiveCount"]) == 3
    assert "RedrivePolicy" not in resources["DeadLetterQueue"]
    # The DLQ keeps messages longer than the queue, so none expires before it is looked at.
    assert (
        resources["DeadLetterQueue"]["MessageRetentionPeriod"]
        > resources["JobQueue"]["MessageRetentionPeriod"]
    )
    # Only S3, from this account's bucket, may send to the queue.
    (policy,) = Stack(template).of_type("AWS::SQS::QueuePolicy").values()
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "s3.amazonaws.com"}
    assert statement["Action"] == "sqs:SendMessage"
    assert statement["Resource"] == GetAtt("JobQueue", "Arn")
    assert statement["Condition"]["ArnEquals"]["aws:SourceArn"] == "arn:aws:s3:::example-bucket"
    assert policy["Queues"] == [Ref("JobQueue")]


def test_timeout_mapping_rows_match_the_allowed_processing_timeouts(
    template: dict[str, Any],
) -> None:
    assert sorted(template["Mappings"]["Timeouts"], key=int) == _allowed(
        template, "ProcessingTimeout"
    )


@pytest.mark.parametrize("worker", ["gpu", "lambda"])
def test_visibility_timeout_follows_the_processing_timeout(
    template: dict[str, Any], worker: str
) -> None:
    for timeout in _allowed(template, "ProcessingTimeout"):
        seconds = int(timeout)
        stack = Stack(template, Worker=worker, ProcessingTimeout=timeout)
        resources = stack.resources
        visibility = int(resources["JobQueue"]["VisibilityTimeout"])
        assert visibility >= seconds
        if worker == "gpu":
            env = _ecs_environment(resources)
            assert "Function" not in resources
        else:
            function = resources["Function"]
            env = function["Environment"]["Variables"]
            lambda_timeout = int(function["Timeout"])
            assert lambda_timeout <= 900
            assert visibility >= 6 * lambda_timeout, (timeout, visibility, lambda_timeout)
            # A one-message batch must get its whole processing timeout before the handler's
            # "hand the rest back" margin starts.
            margin_s = Settings().lambda_min_remaining_ms / 1000
            assert lambda_timeout >= seconds + margin_s
            assert "WorkerService" not in resources
        assert env["PAIRWATCH_COMPARISON__PROCESSING_TIMEOUT"] == timeout


def _ecs_environment(resources: dict[str, Any]) -> dict[str, str]:
    (container,) = resources["WorkerTaskDefinition"]["ContainerDefinitions"]
    return {item["Name"]: item["Value"] for item in container["Environment"]}


# ------------------------------------------------------------------ IAM


def _grants(role: dict[str, Any]) -> dict[str, set[Any]]:
    """action -> resources granted by the role's inline policies (Allow only, no NotAction)."""
    grants: dict[str, set[Any]] = defaultdict(set)
    for policy in role.get("Policies", []):
        for statement in policy["PolicyDocument"]["Statement"]:
            assert statement["Effect"] == "Allow"
            assert "NotAction" not in statement and "NotResource" not in statement
            actions = statement["Action"]
            resources = statement["Resource"]
            for action in [actions] if isinstance(actions, str) else actions:
                assert "*" not in action, f"wildcard action {action}"
                grants[action] |= set([resources] if not isinstance(resources, list) else resources)
    return dict(grants)


def _principal(role: dict[str, Any]) -> str:
    (statement,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Action"] == "sts:AssumeRole"
    service: str = statement["Principal"]["Service"]
    return service


@pytest.mark.parametrize("worker", ["gpu", "lambda"])
def test_iam_is_least_privilege(template: dict[str, Any], worker: str) -> None:
    stack = Stack(template, Worker=worker)
    roles = stack.of_type("AWS::IAM::Role")
    bucket = "arn:aws:s3:::example-bucket"
    inputs, outputs = f"{bucket}/incoming/*", f"{bucket}/results/*"
    consumer = roles.pop("WorkerTaskRole" if worker == "gpu" else "FunctionRole")
    grants = _grants(consumer)
    queue_actions = {"sqs:ReceiveMessage", "sqs:DeleteMessage"}
    if worker == "gpu":
        assert _principal(consumer) == "ecs-tasks.amazonaws.com"
        # `watch sqs` reads the visibility timeout at start and extends it while a pair runs.
        queue_actions |= {"sqs:GetQueueAttributes", "sqs:ChangeMessageVisibility"}
        expected_logs: set[str] = set()
    else:
        assert _principal(consumer) == "lambda.amazonaws.com"
        queue_actions.add("sqs:GetQueueAttributes")  # required by the event source mapping
        expected_logs = {"logs:CreateLogStream", "logs:PutLogEvents"}
    assert grants == {
        "s3:GetObject": {inputs, outputs},
        "s3:ListBucket": {bucket},
        "s3:PutObject": {outputs},
        **{key: {GetAtt("JobQueue", "Arn")} for key in queue_actions},
        **{key: {GetAtt("FunctionLogGroup", "Arn")} for key in expected_logs},
    }
    # Inputs are never written (or deleted): no write grant covers an input key.
    for pattern in grants["s3:PutObject"]:
        assert not fnmatch.fnmatchcase(f"{bucket}/incoming/pair-1/a.jpg", pattern)

    if worker == "gpu":
        execution = _grants(roles.pop("TaskExecutionRole"))
        assert execution.pop("ecr:GetAuthorizationToken") == {"*"}  # no resource-level form
        for action, resources in execution.items():
            assert action.split(":")[0] in {"ecr", "logs"}, action
            assert "*" not in resources
        instance = roles.pop("InstanceRole")
        assert _principal(instance) == "ec2.amazonaws.com"
        assert "Policies" not in instance
        assert [arn.rsplit("/", 1)[1] for arn in instance["ManagedPolicyArns"]] == [
            "AmazonEC2ContainerServiceforEC2Role"
        ]
        # Containers cannot reach the instance role through IMDS (bridge network = 2 hops).
        launch = stack.resources["LaunchTemplate"]["LaunchTemplateData"]
        assert launch["MetadataOptions"] == {"HttpTokens": "required", "HttpPutResponseHopLimit": 1}
    assert roles == {}, f"unexpected roles {sorted(roles)}"


# ------------------------------------------------------------------ GPU service and Lambda


def test_gpu_workers_scale_on_queue_depth(template: dict[str, Any]) -> None:
    stack = Stack(template, Worker="gpu", MaxWorkers="7", MinWorkers="1")
    r = stack.resources
    target = r["WorkerScalableTarget"]
    assert (target["MinCapacity"], target["MaxCapacity"]) == ("1", "7")
    assert target["ResourceId"] == "service/<Cluster>/<WorkerService.Name>"
    assert r["AutoScalingGroup"]["MaxSize"] == "7"
    assert r["AutoScalingGroup"]["NewInstancesProtectedFromScaleIn"] is True
    provider = r["CapacityProvider"]["AutoScalingGroupProvider"]
    assert provider["ManagedScaling"]["Status"] == "ENABLED"
    assert provider["ManagedTerminationProtection"] == "ENABLED"
    service = r["WorkerService"]
    assert service["CapacityProviderStrategy"][0]["CapacityProvider"] == Ref("CapacityProvider")
    (container,) = r["WorkerTaskDefinition"]["ContainerDefinitions"]
    assert container["ResourceRequirements"] == [{"Type": "GPU", "Value": "1"}]

    queue_name = [{"Name": "QueueName", "Value": GetAtt("JobQueue", "QueueName")}]
    out = r["BacklogAlarm"]
    assert (out["MetricName"], out["Dimensions"]) == (
        "ApproximateNumberOfMessagesVisible",
        queue_name,
    )
    assert out["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert out["AlarmActions"] == [Ref("ScaleOutPolicy")]
    idle = r["IdleAlarm"]
    watched = {
        m["MetricStat"]["Metric"]["MetricName"] for m in idle["Metrics"] if "MetricStat" in m
    }
    assert watched == {
        "ApproximateNumberOfMessagesVisible",
        "ApproximateNumberOfMessagesNotVisible",
    }
    assert all(
        m["MetricStat"]["Metric"]["Dimensions"] == queue_name
        for m in idle["Metrics"]
        if "MetricStat" in m
    )
    assert idle["AlarmActions"] == [Ref("ScaleInPolicy")]
    for policy in ("ScaleOutPolicy", "ScaleInPolicy"):
        assert r[policy]["ScalingTargetId"] == Ref("WorkerScalableTarget")
    steps = r["ScaleOutPolicy"]["StepScalingPolicyConfiguration"]["StepAdjustments"]
    assert all(step["ScalingAdjustment"] > 0 for step in steps)


def test_lambda_consumes_the_queue_with_partial_batch_failures(template: dict[str, Any]) -> None:
    r = Stack(template, Worker="lambda").resources
    mapping = r["FunctionQueueMapping"]
    assert mapping["EventSourceArn"] == GetAtt("JobQueue", "Arn")
    assert mapping["FunctionName"] == Ref("Function")
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert int(mapping["ScalingConfig"]["MaximumConcurrency"]) >= 2
    function = r["Function"]
    assert function["PackageType"] == "Image"
    assert function["Environment"]["Variables"]["PAIRWATCH_COMPARATOR"] == "metrics"
    assert function["LoggingConfig"]["LogGroup"] == Ref("FunctionLogGroup")
    assert not any(t.startswith(("AWS::ECS", "AWS::AutoScaling")) for t in _types(r))


def _types(resources: dict[str, dict[str, Any]]) -> set[str]:
    return {resource["Type"] for resource in resources.values()}


# ------------------------------------------------------------------ Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def _exec_form(args: str) -> list[str]:
    parsed = json.loads(args)
    assert isinstance(parsed, list), f"use the exec form: {args}"
    return [str(item) for item in parsed]


def _final_stage(path: Path) -> list[tuple[str, str]]:
    instructions = _instructions(path)
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


@pytest.mark.parametrize("path", [GPU_DOCKERFILE, LAMBDA_DOCKERFILE], ids=lambda p: p.stem)
def test_dockerfile_is_pinned_and_holds_no_secrets(path: Path) -> None:
    instructions = _instructions(path)
    for op, args in instructions:
        if op == "FROM":
            image = args.split()[0]
            name, _, tag = image.rpartition(":")
            assert name and "/" not in tag and re.search(r"\d", tag), f"unpinned base {image}"
            assert tag != "latest"
        if op in {"ENV", "ARG"}:
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args) or [args.split()[0]]
            for variable in names:
                assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", variable, re.I)
        if op in {"COPY", "ADD"} and "--from=" not in args:
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{source} is not in the repository"
                assert not re.search(r"\.aws|\.env|\.netrc|id_rsa", source)
    # Only what the image installs goes into the build context (no .venv of several GB).
    ignore_file = path.with_name(path.name + ".dockerignore").read_text(encoding="utf-8")
    patterns = [line for line in ignore_file.splitlines() if line and not line.startswith("#")]
    assert patterns[0] == "*", "exclude everything, then re-include what the image needs"

    # torch/torchvision pinned exactly as CI pins them (.ci/run).
    pins = set(re.findall(r"\b(torch(?:vision)?==[\w.+]+)", (ROOT / ".ci" / "run").read_text()))
    text = " ".join(args for _, args in instructions)
    assert pins and pins <= set(re.findall(r"\b(torch(?:vision)?==[\w.+]+)", text))


def _gpu_uid() -> int:
    users = [args for op, args in _final_stage(GPU_DOCKERFILE) if op == "USER"]
    assert users, "the GPU image must switch to a non-root user"
    uid = int(users[-1].split(":")[0])
    assert uid != 0
    return uid


def test_gpu_image_runs_pairwatch_as_a_non_root_user_with_a_cache_volume(
    template: dict[str, Any], compose: dict[str, Any]
) -> None:
    stage = _final_stage(GPU_DOCKERFILE)
    uid = _gpu_uid()
    entrypoint = [_exec_form(args) for op, args in stage if op == "ENTRYPOINT"]
    assert entrypoint == [["pairwatch"]]
    env = " ".join(args for op, args in stage if op == "ENV")
    assert "HF_HOME=/cache/" in env
    assert [_exec_form(args) for op, args in stage if op == "VOLUME"] == [["/cache"]]

    # The ECS host folder behind /cache is created for that uid (Docker would make it root's).
    resources = Stack(template, Worker="gpu").resources
    user_data = resources["LaunchTemplate"]["LaunchTemplateData"]["UserData"]
    (host_path,) = (v["Host"]["SourcePath"] for v in resources["WorkerTaskDefinition"]["Volumes"])
    assert f"install -d -o {uid} -g {uid}" in user_data and host_path in user_data
    (container,) = resources["WorkerTaskDefinition"]["ContainerDefinitions"]
    assert {m["ContainerPath"] for m in container["MountPoints"]} == {"/cache"}
    for name in ("worker", "worker-gpu"):
        assert "model-cache:/cache" in compose["services"][name]["volumes"]


def test_lambda_image_runs_the_lambda_handler() -> None:
    stage = _final_stage(LAMBDA_DOCKERFILE)
    (cmd,) = [_exec_form(args) for op, args in stage if op == "CMD"]
    assert cmd == ["handler.app.lambda_handler"]
    module_name, attribute = cmd[0].rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module_name), attribute))
    env = " ".join(args for op, args in stage if op == "ENV")
    assert "PAIRWATCH_COMPARATOR=metrics" in env
    assert "download.pytorch.org/whl/cpu" in " ".join(args for _, args in stage)


# ------------------------------------------------------------------ commands and settings


def _container_commands(template: dict[str, Any], compose: dict[str, Any]) -> dict[str, list[str]]:
    """Every ``pairwatch`` argv a container runs, by where it is configured."""
    (container,) = Stack(template, Worker="gpu").resources["WorkerTaskDefinition"][
        "ContainerDefinitions"
    ]
    commands = {
        "ecs worker": [
            FAKE_QUEUE_URL if arg == Ref("JobQueue") else arg for arg in container["Command"]
        ]
    }
    for name, service in compose["services"].items():
        if service.get("build", {}).get("dockerfile") == "infra/docker/gpu.Dockerfile":
            commands[f"compose {name}"] = [str(arg) for arg in service["command"]]
    stage = _final_stage(GPU_DOCKERFILE)
    commands["gpu image CMD"] = [
        arg for op, args in stage if op == "CMD" for arg in _exec_form(args)
    ]
    return commands


def test_every_container_command_exists_in_the_cli(
    template: dict[str, Any], compose: dict[str, Any]
) -> None:
    commands = _container_commands(template, compose)
    assert {"ecs worker", "compose worker", "compose worker-gpu", "gpu image CMD"} <= set(commands)
    expected = {
        "ecs worker": "watch-sqs",
        "compose worker": "watch-minio",
        "compose worker-gpu": "watch-minio",
    }
    for where, argv in commands.items():
        parser = build_parser()
        try:
            args = parser.parse_args(_normalise_argv(argv))
        except SystemExit as exc:
            assert exc.code == 0, f"{where}: `pairwatch {shlex.join(argv)}` is not a valid command"
            continue
        assert args.command == expected[where], where
        assert args.command in COMMANDS


def _compose_value(value: Any) -> str:
    """A compose value with ``${VAR:-default}`` as its default (``${VAR:?error}`` as "x")."""
    return re.sub(r"\$\{\w+(?::?-([^}]*)|:?\?[^}]*)?\}", lambda m: m.group(1) or "x", str(value))


def _pairwatch_environment(template: dict[str, Any], compose: dict[str, Any]) -> dict[str, Any]:
    """The ``PAIRWATCH_*`` variables of every container, by where they are configured."""
    found: dict[str, dict[str, str]] = {}
    found["ecs worker"] = _ecs_environment(Stack(template, Worker="gpu").resources)
    found["lambda"] = Stack(template, Worker="lambda").resources["Function"]["Environment"][
        "Variables"
    ]
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        found[f"compose {name}"] = {k: _compose_value(v) for k, v in env.items()}
    for path in (GPU_DOCKERFILE, LAMBDA_DOCKERFILE):
        env_args = " ".join(args for op, args in _final_stage(path) if op == "ENV")
        found[path.name] = dict(re.findall(r"(\w+)=(\S+)", env_args))
    return {
        where: {k: v for k, v in env.items() if k.startswith("PAIRWATCH_")}
        for where, env in found.items()
    }


def _setting_path(name: str) -> list[str]:
    """``PAIRWATCH_COMPARISON__PROCESSING_TIMEOUT`` -> ["comparison", "processing_timeout"]."""
    path = name.removeprefix("PAIRWATCH_").lower().split("__")
    fields: dict[str, Any] = Settings.model_fields
    for depth, part in enumerate(path):
        assert part in fields, f"{name} is not a setting"
        if depth < len(path) - 1:
            assert part == "comparison", f"{name} is not a setting"
            fields = ComparisonConfig.model_fields
    return path


def _same(got: Any, value: str) -> bool:
    if isinstance(got, bool):
        return got == (value.lower() in {"1", "true", "yes", "on"})
    if isinstance(got, int | float):
        return float(got) == float(value)
    return str(got) == value


def test_every_pairwatch_variable_is_a_valid_setting(
    template: dict[str, Any], compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    environments = _pairwatch_environment(template, compose)
    assert environments["ecs worker"] and environments["lambda"]
    for where, env in environments.items():
        with monkeypatch.context() as patch:
            for name in [k for k in os.environ if k.startswith("PAIRWATCH_")]:
                patch.delenv(name)
            # pydantic-settings ignores unknown variables, so a typo would pass silently.
            paths = {name: _setting_path(name) for name in env}
            for name, value in env.items():
                patch.setenv(name, value)
            settings = Settings()  # raises on an invalid value
            for name, value in env.items():
                got: Any = settings
                for part in paths[name]:
                    got = getattr(got, part)
                assert _same(got, value), f"{where}: {name}={value} read as {got!r}"


# ------------------------------------------------------------------ local MinIO


def test_compose_wires_minio_bucket_worker_and_webhook(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if "image" in service and "build" not in service:
            tag = service["image"].rpartition(":")[2]
            assert re.search(r"\d", tag) and tag != "latest", f"{name}: unpinned image"
        if "build" in service:
            assert (COMPOSE.parent / service["build"]["context"]).resolve() == ROOT
            assert (ROOT / service["build"]["dockerfile"]).is_file()
    assert all(port.startswith("127.0.0.1:") for port in services["minio"]["ports"])
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"].startswith(
        "${MINIO_ROOT_PASSWORD:?"
    ), "no password committed to the repository"

    (bucket,) = re.findall(r"mc mb --ignore-existing local/(\S+)", services["setup"]["command"][0])
    watched = {services[name]["command"][-1] for name in ("worker", "worker-gpu")}
    assert watched == {f"s3://{bucket}/incoming/"}
    # One consumer at a time: each worker is in its own profile.
    consumers = ("worker", "worker-gpu", "lambda")
    assert len({tuple(services[name]["profiles"]) for name in consumers}) == len(consumers)

    # The webhook alternative: every suffix written out, none matching an output.
    script = services["webhook-setup"]["command"][0]
    (suffix_list,) = re.findall(r"for suffix in ([^;]+); do", script)
    assert set(suffix_list.split()) == EXPECTED_SUFFIXES
    (event_add,) = [line.split() for line in script.splitlines() if "mc event add" in line]
    flags = dict(itertools.pairwise(event_add))  # each word -> the next one
    assert flags["--event"] == "put" and flags["--suffix"] == '"$$suffix"'
    assert f"local/{bucket}" in event_add
    assert flags["--prefix"] == "incoming/"
    (target,) = re.findall(r"notify_webhook:(\w+)", script)
    assert f"arn:minio:sqs::{target}:webhook" in event_add
    (endpoint,) = re.findall(r"endpoint=(\S+)", script)
    assert endpoint == "http://lambda:8080/2015-03-31/functions/function/invocations"
    assert services["lambda"]["build"]["dockerfile"] == "infra/docker/lambda.Dockerfile"

    output_prefix = services["lambda"]["environment"]["PAIRWATCH_OUTPUT_PREFIX"]
    for name in ("worker", "worker-gpu"):
        assert services[name]["environment"]["PAIRWATCH_OUTPUT_PREFIX"] == output_prefix
    rules = [(flags["--prefix"], suffix) for suffix in EXPECTED_SUFFIXES]
    # `watch minio s3://BUCKET/incoming/` works relative to its prefix.
    storage = S3Storage(None, bucket, "incoming/", output_prefix=output_prefix)  # type: ignore[arg-type]
    for name in OUTPUT_NAMES:
        _, key = storage.location(name)
        assert not _notified(rules, key), key


# ------------------------------------------------------------------ the stack, deployed on moto


@pytest.mark.slow
def test_deployed_stack_compares_a_pair_and_its_outputs_notify_nothing(
    template: dict[str, Any],
) -> None:
    """Deploy the GPU stack on moto (standing in for AWS, which CI cannot reach), then run the
    task definition's own command and environment as a subprocess against it.

    Where moto falls short, and what stands in: its CloudFormation creates the bucket but not the
    bucket's notification rules, so the template's own rules are applied with the S3 API; it
    skips the queue policy, capacity provider, scaling and alarms (checked statically above);
    it enforces no IAM (the grants are checked above); and there is no GPU here, so the task's
    ``vl`` comparator is swapped for ``metrics``: the comparator is not what is under test.
    """
    with moto_server() as endpoint:
        ec2, cfn = client("ec2", endpoint), client("cloudformation", endpoint)
        s3, sqs = client("s3", endpoint), client("sqs", endpoint)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
        bucket = unique("pairwatch")
        parameters = {"BucketName": bucket, "ImageUri": "pairwatch-gpu:test"}
        parameters |= {"Worker": "gpu", "VpcId": vpc, "SubnetIds": subnet}
        with warnings.catch_warnings():  # moto skips, with a warning, what it cannot create
            warnings.simplefilter("ignore", UserWarning)
            cfn.create_stack(
                StackName=bucket,
                TemplateBody=TEMPLATE.read_text(encoding="utf-8"),
                Parameters=[
                    {"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()
                ],
                Capabilities=["CAPABILITY_IAM"],
            )
        (stack,) = cfn.describe_stacks(StackName=bucket)["Stacks"]
        assert stack["StackStatus"] == "CREATE_COMPLETE"
        outputs = {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}
        queue_url, dlq_url = outputs["QueueUrl"], outputs["DeadLetterQueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])
        queue_arn = attributes["Attributes"]["QueueArn"]
        redrive = json.loads(attributes["Attributes"]["RedrivePolicy"])
        assert redrive["maxReceiveCount"] == 3

        # The template's rules, spelled the S3 API's way.
        rules = _notification_rules(Stack(template, **parameters))
        s3.put_bucket_notification_configuration(
            Bucket=bucket,
            NotificationConfiguration={
                "QueueConfigurations": [
                    {
                        "QueueArn": queue_arn,
                        "Events": ["s3:ObjectCreated:*"],
                        "Filter": {
                            "Key": {
                                "FilterRules": [
                                    {"Name": "prefix", "Value": prefix},
                                    {"Name": "suffix", "Value": suffix},
                                ]
                            }
                        },
                    }
                    for prefix, suffix in rules
                ]
            },
        )
        _drain(sqs, queue_url)  # s3:TestEvent

        photo = scenes.photo("astronaut").resize((96, 96))
        s3.put_object(Bucket=bucket, Key="incoming/pair-1/before.jpg", Body=scenes.encode(photo))
        s3.put_object(
            Bucket=bucket, Key="incoming/pair-1/after.PNG", Body=scenes.as_png(photo.rotate(15))
        )
        s3.put_object(Bucket=bucket, Key="incoming/pair-1/notes.txt", Body=b"not an image")
        wait_for(lambda: _queued(sqs, queue_url) == 2, 10, what="two notifications")

        (task_arn,) = client("ecs", endpoint).list_task_definitions()["taskDefinitionArns"]
        definition = client("ecs", endpoint).describe_task_definition(taskDefinition=task_arn)
        (container,) = definition["taskDefinition"]["containerDefinitions"]
        assert container["command"] == ["watch", "sqs", queue_url]
        env = {item["name"]: item["value"] for item in container["environment"]}
        env |= {"PAIRWATCH_COMPARATOR": "metrics", "PAIRWATCH_DEVICE": "cpu"}
        env |= {"PAIRWATCH_SQS_WAIT_SECONDS": "1", "PAIRWATCH_LOG_FORMAT": "json"}
        argv = [*container["command"], "--exit-when-idle", "--endpoint-url", endpoint]
        proc = subprocess.run(
            [sys.executable, "-m", "watcher.cli", *argv],
            cwd=ROOT,
            env={**os.environ, **aws_env(), **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

        result_key = "results/incoming/pair-1/result.json"
        result = json.loads(s3.get_object(Bucket=bucket, Key=result_key)["Body"].read())
        assert result["status"] == "ok", result
        assert [i["name"] for i in result["inputs"]] == ["after.PNG", "before.jpg"]
        assert _queued(sqs, queue_url) == 0 and _queued(sqs, dlq_url) == 0
        assert "incoming/pair-1/notes.txt" in {
            o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="incoming/")["Contents"]
        }

        # Everything the worker wrote is outside the rules: writing it again notifies nothing.
        written = [
            o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="results/")["Contents"]
        ]
        assert set(written) == {result_key, "results/incoming/pair-1/diff.png"}
        for key in written:
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
            s3.put_object(Bucket=bucket, Key=key, Body=body)
        assert sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1).get("Messages") is None


def _queued(sqs: Any, queue_url: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    found = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return sum(int(found[name]) for name in names)


def _drain(sqs: Any, queue_url: str) -> None:
    while messages := sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0).get("Messages"):
        for message in messages:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
