"""The deployment files under infra/ fit each other and the code.

CI has no Docker engine and no cloud. cfn-lint (the template against CloudFormation's schemas)
and hadolint (Dockerfile practice) run in .ci/run; these tests check what neither linter knows:
the notification -> queue -> dead-letter wiring and its alarm, timeouts derived from the
processing timeout, suffix filters that cannot match the handler's own outputs (computed with the
real ``S3Storage``), least-privilege IAM, the engine option's wiring (workers know the endpoint,
nothing outside the workers can reach it), scaling on backlog per task, deploys that cannot cut
pairs, and that every command and ``PAIRWATCH_*`` variable a container is given exists in the
real CLI and ``Settings``. The last test deploys the GPU stack on moto and runs the task
definition's command against it. The template is evaluated by ``tests.support.cfn``.
"""

from __future__ import annotations

import fnmatch
import importlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from handler.compare.vl.comparator import pixel_budget
from handler.config import ComparisonConfig, Settings
from handler.pairs import IMAGE_SUFFIXES, MANIFEST_SUFFIX, is_output_name, is_relevant_name
from handler.s3_storage import S3Storage
from tests.support import scenes
from tests.support.cfn import GetAtt, Ref, Stack, load_template
from tests.support.s3_servers import aws_env, client, moto_server, unique
from tests.support.waiting import wait_for
from watcher.cli import _normalise_argv, build_parser
from watcher.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
TEMPLATE = INFRA / "aws" / "template.yaml"
COMPOSE = INFRA / "minio" / "docker-compose.yml"
INFRA_README = INFRA / "README.md"
GPU_DOCKERFILE = INFRA / "docker" / "gpu.Dockerfile"
CPU_DOCKERFILE = INFRA / "docker" / "cpu.Dockerfile"
LAMBDA_DOCKERFILE = INFRA / "docker" / "lambda.Dockerfile"
DOCKERFILES = (GPU_DOCKERFILE, CPU_DOCKERFILE, LAMBDA_DOCKERFILE)
TORCHLESS_DOCKERFILES = (CPU_DOCKERFILE, LAMBDA_DOCKERFILE)

#: Every key a notification must cover: S3 and MinIO suffix filters are literal and
#: case-sensitive, so each suffix is listed in lower and upper case.
EXPECTED_SUFFIXES = {
    variant for suffix in (*IMAGE_SUFFIXES, MANIFEST_SUFFIX) for variant in (suffix, suffix.upper())
}
#: The handler's own outputs for a pair folder and for a manifest.
OUTPUT_NAMES = ("pair-1/result.json", "pair-1/diff.png", "m.result.json", "m.diff.png")
FAKE_QUEUE_URL = "https://sqs.us-east-1.amazonaws.com/123456789012/pairwatch-JobQueue"
NETWORK = {"VpcId": "vpc-0123456789abcdef0", "SubnetIds": "subnet-0123456789abcdef0"}
#: Every deployable (Worker, Engine) combination, with the network it needs.
DEPLOYMENTS = {
    "gpu": {"Worker": "gpu", **NETWORK},
    "fargate": {"Worker": "fargate", "ProcessingTimeout": "60", **NETWORK},
    "lambda": {"Worker": "lambda"},
    "fargate+vllm": {"Worker": "fargate", "Engine": "vllm", "ProcessingTimeout": "60", **NETWORK},
    "lambda+vllm": {"Worker": "lambda", "Engine": "vllm", **NETWORK},
}
ECS_WORKERS = ("gpu", "fargate", "fargate+vllm")
WITH_ENGINE = ("fargate+vllm", "lambda+vllm")
#: Minimum NVIDIA driver per CUDA major.minor (NVIDIA's CUDA toolkit release notes, Linux).
CUDA_MIN_DRIVER = {"12.8": (570, 26), "12.9": (575, 51), "13.0": (580, 65)}
#: Driver of the pinned ECS GPU AMI (aws/amazon-ecs-ami release 20261113 notes).
PINNED_AMI_DRIVER = {"al2023-ami-ecs-gpu-hvm-2023.0.20261113-kernel-6.1-x86_64-ebs": (580, 178)}
#: CUDA the pinned vLLM image is built on (vLLM's docker/Dockerfile, CUDA_VERSION).
VLLM_IMAGE_CUDA = {"v0.33.0": "13.0"}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template(TEMPLATE)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return loaded


def _allowed(template: dict[str, Any], name: str) -> list[str]:
    return [str(v) for v in template["Parameters"][name]["AllowedValues"]]


def _deployed(template: dict[str, Any], deployment: str, **overrides: str) -> Stack:
    stack = Stack(template, **(DEPLOYMENTS[deployment] | overrides))
    assert stack.violations() == [], (deployment, overrides)
    return stack


# ------------------------------------------------------------------ parameters and rules


def test_rules_accept_each_deployment_and_refuse_what_cannot_work(
    template: dict[str, Any],
) -> None:
    for deployment in DEPLOYMENTS:
        _deployed(template, deployment)
    refused = {
        "GPU workers run the model themselves": {"Worker": "gpu", "Engine": "vllm", **NETWORK},
        "ECS needs a VPC": {"Worker": "fargate", "ProcessingTimeout": "60"},
        "the engine needs a VPC": {"Worker": "lambda", "Engine": "vllm"},
        "Fargate's 120 s stop cap": {"Worker": "fargate", "ProcessingTimeout": "120", **NETWORK},
        "a Lambda would spend receives on a cold engine": {
            **DEPLOYMENTS["lambda+vllm"],
            "MinEngineTasks": "0",
        },
        "overlapping prefixes": {"Worker": "lambda", "OutputPrefix": "incoming/"},
    }
    for why, parameters in refused.items():
        assert Stack(template, **parameters).violations(), why


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


def test_queue_redrives_to_an_alarmed_dead_letter_queue(template: dict[str, Any]) -> None:
    """Defect 6: pairs reaching the DLQ raise an alarm; 5 receives (defect 5, AWS's minimum
    for Lambda event sources) leave room for retryable failures' back-off."""
    stack = Stack(template, AlarmEmail="ops@example.com")
    resources = stack.resources
    redrive = resources["JobQueue"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == GetAtt("DeadLetterQueue", "Arn")
    assert int(redrive["maxReceiveCount"]) >= 5
    assert "RedrivePolicy" not in resources["DeadLetterQueue"]
    # The DLQ keeps messages longer than the queue, so none expires before it is looked at.
    assert (
        resources["DeadLetterQueue"]["MessageRetentionPeriod"]
        > resources["JobQueue"]["MessageRetentionPeriod"]
    )
    alarm = resources["DeadLetterAlarm"]
    assert alarm["Dimensions"] == [
        {"Name": "QueueName", "Value": GetAtt("DeadLetterQueue", "QueueName")}
    ]
    assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == (
        "GreaterThanOrEqualToThreshold",
        1,
    )
    assert alarm["AlarmActions"] == [Ref("AlarmTopic")]
    assert "KmsMasterKeyId" not in resources["AlarmTopic"]  # CloudWatch could not publish
    subscription = resources["AlarmEmailSubscription"]
    assert (subscription["TopicArn"], subscription["Endpoint"]) == (
        Ref("AlarmTopic"),
        "ops@example.com",
    )
    assert "AlarmEmailSubscription" not in Stack(template).resources

    # Only S3, from this account's bucket, may send to the queue.
    (policy,) = stack.of_type("AWS::SQS::QueuePolicy").values()
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


def _ecs_container(resources: dict[str, Any], definition: str = "WorkerTaskDefinition") -> Any:
    (container,) = resources[definition]["ContainerDefinitions"]
    return container


def _ecs_environment(resources: dict[str, Any]) -> dict[str, str]:
    return {item["Name"]: item["Value"] for item in _ecs_container(resources)["Environment"]}


def _worker_environment(stack: Stack) -> dict[str, str]:
    resources = stack.resources
    if "Function" in resources:
        return dict(resources["Function"]["Environment"]["Variables"])
    return _ecs_environment(resources)


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_timeouts_follow_the_processing_timeout(template: dict[str, Any], deployment: str) -> None:
    """Defect 3: a stopping task gets its pairs' whole budget; the engine's load balancer never
    cuts a request the worker still waits for and drains a leaving task first."""
    for timeout in _allowed(template, "ProcessingTimeout"):
        stack = Stack(template, **(DEPLOYMENTS[deployment] | {"ProcessingTimeout": timeout}))
        if stack.violations():
            assert deployment.startswith("fargate") and int(timeout) > 60
            continue
        seconds = int(timeout)
        resources = stack.resources
        visibility = int(resources["JobQueue"]["VisibilityTimeout"])
        assert visibility >= seconds
        if deployment in ECS_WORKERS:
            stop = int(_ecs_container(resources)["StopTimeout"])
            assert stop >= seconds + 30, "a stopped task must finish the pairs in hand"
            if deployment.startswith("fargate"):
                assert stop <= 120  # Fargate's maximum
            assert "Function" not in resources
        else:
            function = resources["Function"]
            lambda_timeout = int(function["Timeout"])
            assert lambda_timeout <= 900
            assert visibility >= 6 * lambda_timeout, (timeout, visibility, lambda_timeout)
            # A one-message batch must get its whole processing timeout before the handler's
            # "hand the rest back" margin starts.
            margin_s = Settings().lambda_min_remaining_ms / 1000
            assert lambda_timeout >= seconds + margin_s
            assert "WorkerService" not in resources
        if deployment in WITH_ENGINE:
            attributes = {
                a["Key"]: int(a["Value"])
                for a in resources["EngineLoadBalancer"]["LoadBalancerAttributes"]
                if a["Key"] == "idle_timeout.timeout_seconds"
            }
            assert attributes["idle_timeout.timeout_seconds"] > seconds
            group = {
                a["Key"]: a["Value"]
                for a in resources["EngineTargetGroup"]["TargetGroupAttributes"]
            }
            assert int(group["deregistration_delay.timeout_seconds"]) >= seconds
        assert _worker_environment(stack)["PAIRWATCH_COMPARISON__PROCESSING_TIMEOUT"] == timeout


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


def _managed(role: dict[str, Any]) -> list[str]:
    return [arn.rsplit("/", 1)[1] for arn in role.get("ManagedPolicyArns", [])]


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_iam_is_least_privilege(template: dict[str, Any], deployment: str) -> None:
    stack = _deployed(template, deployment)
    resources = stack.resources
    roles = stack.of_type("AWS::IAM::Role")
    bucket = "arn:aws:s3:::example-bucket"
    inputs, outputs = f"{bucket}/incoming/*", f"{bucket}/results/*"
    on_lambda = deployment.startswith("lambda")
    consumer = roles.pop("FunctionRole" if on_lambda else "WorkerTaskRole")
    grants = _grants(consumer)
    queue_actions = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"}
    if on_lambda:
        assert _principal(consumer) == "lambda.amazonaws.com"
        expected_logs = {"logs:CreateLogStream", "logs:PutLogEvents"}
        # handler.app keeps a retried message invisible until it is due (retry policy).
        queue_actions |= {"sqs:GetQueueUrl", "sqs:ChangeMessageVisibility"}
        # In the VPC only with the engine: Lambda's own policy for the function's ENIs.
        vpc_policy = ["AWSLambdaVPCAccessExecutionRole"] if "vllm" in deployment else []
        assert _managed(consumer) == vpc_policy
    else:
        assert _principal(consumer) == "ecs-tasks.amazonaws.com"
        # `watch sqs` reads the visibility timeout at start and extends it while a pair runs.
        queue_actions.add("sqs:ChangeMessageVisibility")
        expected_logs = set()
        assert _managed(consumer) == []
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

    if "TaskExecutionRole" in roles:
        execution = _grants(roles.pop("TaskExecutionRole"))
        assert execution.pop("ecr:GetAuthorizationToken") == {"*"}  # no resource-level form
        # Defect 6: pulls from the image's own repository, not every repository in the account.
        repository = "arn:aws:ecr:us-east-1:123456789012:repository/pairwatch"
        for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"):
            assert execution.pop(action) == {repository}
        assert execution.pop("ecr:BatchCheckLayerAvailability") == {repository}
        assert execution == {
            "logs:CreateLogStream": {GetAtt("TaskLogGroup", "Arn")},
            "logs:PutLogEvents": {GetAtt("TaskLogGroup", "Arn")},
        }
        image = (
            _ecs_container(resources)["Image"]
            if "WorkerTaskDefinition" in resources
            else resources["Function"]["Code"]["ImageUri"]
        )
        assert image == "123456789012.dkr.ecr.us-east-1.amazonaws.com/pairwatch:0.1.0"
    if "InstanceRole" in roles:
        instance = roles.pop("InstanceRole")
        assert _principal(instance) == "ec2.amazonaws.com"
        assert "Policies" not in instance
        assert _managed(instance) == ["AmazonEC2ContainerServiceforEC2Role"]
        # Containers cannot reach the instance role through IMDS (bridge network = 2 hops).
        launch = resources["LaunchTemplate"]["LaunchTemplateData"]
        assert launch["MetadataOptions"] == {"HttpTokens": "required", "HttpPutResponseHopLimit": 1}
        # ... nor awsvpc tasks (the engine), which the agent keeps off IMDS.
        assert "ECS_AWSVPC_BLOCK_IMDS=true" in launch["UserData"]
    assert roles == {}, f"unexpected roles {sorted(roles)}"
    if "EngineTaskDefinition" in resources:
        assert "TaskRoleArn" not in resources["EngineTaskDefinition"]  # vLLM needs no AWS access


# ------------------------------------------------------------------ the vLLM engine


@pytest.mark.parametrize("deployment", WITH_ENGINE)
def test_workers_call_the_engine_which_only_they_can_reach(
    template: dict[str, Any], deployment: str
) -> None:
    stack = _deployed(template, deployment)
    r = stack.resources
    env = _worker_environment(stack)
    assert env["PAIRWATCH_COMPARATOR"] == "vl"
    assert env["PAIRWATCH_VL_BACKEND"] == "openai"
    assert env["PAIRWATCH_VL_ENDPOINT"] == "http://<EngineLoadBalancer.DNSName>/v1"
    assert env["PAIRWATCH_DEVICE"] == "cpu"
    if deployment.startswith("lambda"):
        # A cold start waits for the engine well within the function's own timeout.
        timeout = float(stack.resolve(r["Function"]["Timeout"]))
        assert 0 < float(env["PAIRWATCH_VL_LOAD_TIMEOUT"]) <= timeout / 4
    else:
        # Fargate workers wait for a cold engine as long as it takes to start (no receives).
        assert "PAIRWATCH_VL_LOAD_TIMEOUT" not in env
    vllm = _ecs_container(r, "EngineTaskDefinition")
    flags = _vllm_flags(vllm["Command"])
    assert env["PAIRWATCH_MODEL"] == flags["--served-model-name"] == "pairwatch-vl"
    assert vllm["Command"][0] == stack.params["ModelId"]
    assert vllm["ResourceRequirements"] == [{"Type": "GPU", "Value": "1"}]

    # The load balancer: internal, HTTP to vLLM's port, healthy once the model is loaded.
    lb = r["EngineLoadBalancer"]
    assert lb["Scheme"] == "internal"
    assert lb["SecurityGroups"] == [Ref("EngineLoadBalancerSecurityGroup")]
    (listener,) = stack.of_type("AWS::ElasticLoadBalancingV2::Listener").values()
    assert listener["LoadBalancerArn"] == Ref("EngineLoadBalancer")
    assert listener["DefaultActions"] == [
        {"Type": "forward", "TargetGroupArn": Ref("EngineTargetGroup")}
    ]
    group = r["EngineTargetGroup"]
    (mapping,) = vllm["PortMappings"]
    assert group["Port"] == mapping["ContainerPort"] == int(flags["--port"])
    assert group["HealthCheckPath"] == "/health"
    service = r["EngineService"]
    assert service["LoadBalancers"] == [
        {
            "ContainerName": "vllm",
            "ContainerPort": group["Port"],
            "TargetGroupArn": Ref("EngineTargetGroup"),
        }
    ]
    assert service["NetworkConfiguration"]["AwsvpcConfiguration"]["AssignPublicIp"] == "DISABLED"
    assert service["NetworkConfiguration"]["AwsvpcConfiguration"]["SecurityGroups"] == [
        Ref("EngineTaskSecurityGroup")
    ]

    # Who may connect to what: no CIDR ingress anywhere; LB <- workers, tasks <- LB.
    groups = stack.of_type("AWS::EC2::SecurityGroup")
    assert all("SecurityGroupIngress" not in group for group in groups.values())
    ingress = {
        (rule["GroupId"], rule["SourceSecurityGroupId"], rule["FromPort"], rule["ToPort"])
        for rule in stack.of_type("AWS::EC2::SecurityGroupIngress").values()
    }
    assert ingress == {
        (Ref("EngineLoadBalancerSecurityGroup"), Ref("WorkerSecurityGroup"), 80, 80),
        (Ref("EngineTaskSecurityGroup"), Ref("EngineLoadBalancerSecurityGroup"), 8000, 8000),
    }
    egress = {
        (rule["GroupId"], rule["DestinationSecurityGroupId"], rule["FromPort"])
        for rule in stack.of_type("AWS::EC2::SecurityGroupEgress").values()
    }
    assert egress == {(Ref("WorkerSecurityGroup"), Ref("EngineLoadBalancerSecurityGroup"), 80)}
    # The workers sit in that group.
    if deployment.startswith("lambda"):
        assert r["Function"]["VpcConfig"]["SecurityGroupIds"] == [Ref("WorkerSecurityGroup")]
    else:
        network = r["WorkerService"]["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert network["SecurityGroups"] == [Ref("WorkerSecurityGroup")]
        assert network["AssignPublicIp"] == "DISABLED"
    outputs = template["Outputs"]
    assert stack.resolve(outputs["EngineEndpoint"]["Value"]) == env["PAIRWATCH_VL_ENDPOINT"]


def test_an_engine_api_key_reaches_both_sides_as_an_ecs_secret_only(
    template: dict[str, Any],
) -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:pairwatch-vl-AbCdEf"
    stack = _deployed(template, "fargate+vllm", EngineApiKeySecretArn=arn)
    r = stack.resources
    worker, vllm = _ecs_container(r), _ecs_container(r, "EngineTaskDefinition")
    assert worker["Secrets"] == [{"Name": "PAIRWATCH_VL_API_KEY", "ValueFrom": arn}]
    assert vllm["Secrets"] == [{"Name": "VLLM_API_KEY", "ValueFrom": arn}]
    # The execution role (ECS's agent, not the code) reads that one secret.
    execution = _grants(r["TaskExecutionRole"])
    assert execution["secretsmanager:GetSecretValue"] == {arn}
    # Never as plain text in an environment.
    for container in (worker, vllm):
        assert not any("API_KEY" in item["Name"] for item in container["Environment"])
    plain = _deployed(template, "fargate+vllm").resources
    assert "Secrets" not in _ecs_container(plain)
    assert "secretsmanager:GetSecretValue" not in _grants(plain["TaskExecutionRole"])
    # A Lambda could only carry the key in its (readable) configuration: refused.
    assert Stack(template, **DEPLOYMENTS["lambda+vllm"], EngineApiKeySecretArn=arn).violations()


@pytest.mark.parametrize("deployment", ["gpu", "fargate", "lambda"])
def test_without_the_engine_workers_run_their_own_comparator(
    template: dict[str, Any], deployment: str
) -> None:
    stack = _deployed(template, deployment)
    env = _worker_environment(stack)
    assert "PAIRWATCH_VL_BACKEND" not in env and "PAIRWATCH_VL_ENDPOINT" not in env
    assert not any(name.startswith("Engine") for name in stack.resources)
    if deployment == "gpu":
        assert (env["PAIRWATCH_COMPARATOR"], env["PAIRWATCH_DEVICE"]) == ("vl", "cuda")
        assert env["PAIRWATCH_MODEL"] == stack.params["ModelId"]
    else:
        assert (env["PAIRWATCH_COMPARATOR"], env["PAIRWATCH_DEVICE"]) == ("metrics", "cpu")
        assert not any(t.startswith("AWS::AutoScaling") for t in _types(stack.resources))


def _vllm_flags(argv: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a ``vllm serve MODEL ...`` argument list."""
    flags = dict(itertools.pairwise(argv[1:]))
    return {k: v for k, v in flags.items() if k.startswith("--")}


def _vllm_commands(template: dict[str, Any], compose: dict[str, Any]) -> dict[str, list[str]]:
    stack = _deployed(template, "fargate+vllm")
    ecs = _ecs_container(stack.resources, "EngineTaskDefinition")["Command"]
    return {
        "ecs": [str(a) for a in ecs],
        "compose": [str(a) for a in compose["services"]["vllm"]["command"]],
    }


def test_vllm_caps_image_tokens_and_fits_a_pair(
    template: dict[str, Any], compose: dict[str, Any]
) -> None:
    """The engine is sized for what pairwatch sends: at most ``images`` images per request,
    each capped at the comparator's pixel budget, plus the prompt and the answer budget."""
    default_pixels = pixel_budget(ComparisonConfig().max_image_size)
    for where, argv in _vllm_commands(template, compose).items():
        flags = _vllm_flags(argv)
        images = json.loads(flags["--limit-mm-per-prompt"])["image"]
        assert images >= 2, where  # the two overviews, then the crops
        max_pixels = json.loads(flags["--mm-processor-kwargs"])["max_pixels"]
        assert max_pixels == default_pixels, where
        tokens_per_image = math.ceil(max_pixels / (28 * 28))  # Qwen2-VL: one per 28x28 px
        prompt_allowance = 512
        needed = images * tokens_per_image + prompt_allowance + Settings().vl_max_new_tokens
        assert int(flags["--max-model-len"]) >= needed, (where, needed)
        assert flags["--served-model-name"] == "pairwatch-vl"
    ecs = _vllm_flags(_vllm_commands(template, compose)["ecs"])
    compose_flags = _vllm_flags(_vllm_commands(template, compose)["compose"])
    assert ecs == compose_flags  # one engine configuration, two places
    # Same pinned engine image in both places.
    assert template["Parameters"]["EngineImage"]["Default"] == compose["services"]["vllm"]["image"]


# ------------------------------------------------------------------ scaling


def _metric_math(queries: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The returned expression and the metric of each id."""
    (expression,) = [q["Expression"] for q in queries if q.get("ReturnData")]
    metrics = {q["Id"]: q["MetricStat"]["Metric"] for q in queries if "MetricStat" in q}
    return expression, metrics


def _evaluate(expression: str, **values: float | None) -> float:
    """A CloudWatch metric-math expression of IF/FILL/AND and arithmetic, for given values."""
    functions = {
        "IF": lambda condition, yes, no: yes if condition else no,
        "FILL": lambda value, default: default if value is None else value,
    }
    python = expression.replace(" AND ", " and ")
    return float(eval(python, {"__builtins__": {}, **functions}, values))


def _service_metrics(service: str) -> dict[str, Any]:
    queue = [{"Name": "QueueName", "Value": GetAtt("JobQueue", "QueueName")}]
    return {
        "waiting": {
            "Namespace": "AWS/SQS",
            "MetricName": "ApproximateNumberOfMessagesVisible",
            "Dimensions": queue,
        },
        "inhand": {
            "Namespace": "AWS/SQS",
            "MetricName": "ApproximateNumberOfMessagesNotVisible",
            "Dimensions": queue,
        },
        "tasks": {
            "Namespace": "ECS/ContainerInsights",
            "MetricName": "DesiredTaskCount",
            "Dimensions": [
                {"Name": "ClusterName", "Value": Ref("Cluster")},
                {"Name": "ServiceName", "Value": GetAtt(service, "Name")},
            ],
        },
    }


def _simulate(expression: str, target: float, lo: int, hi: int, start: int, load: Any) -> int:
    """Target tracking as Application Auto Scaling applies it (capacity x metric / target,
    rounded up, within bounds) over 30 one-minute periods; ``load(tasks)`` -> (waiting, inhand)."""
    tasks = start
    for _ in range(30):
        waiting, inhand = load(tasks)
        if tasks == 0:
            break  # target tracking scales the current count: zero stays zero
        metric = _evaluate(expression, waiting=waiting, inhand=inhand, tasks=tasks)
        tasks = min(hi, max(lo, math.ceil(tasks * metric / target)))
    return tasks


@pytest.mark.parametrize(
    ("deployment", "prefix"),
    [
        ("gpu", "Worker"),
        ("fargate", "Worker"),
        ("fargate+vllm", "Worker"),
        ("fargate+vllm", "Engine"),
    ],
)
def test_services_scale_on_backlog_per_task_with_a_step_only_from_zero(
    template: dict[str, Any], deployment: str, prefix: str
) -> None:
    """Defect 4: one upload from zero starts one task, not the whole fleet; a trickle keeps
    only what it needs; a backlog scales to what the target asks for; an empty queue lets the
    fleet go to its minimum."""
    bounds = {"MinWorkers": "0", "MaxWorkers": "9", "MinEngineTasks": "0", "MaxEngineTasks": "9"}
    stack = _deployed(template, deployment, **bounds)
    r = stack.resources
    service = f"{prefix}Service"
    target = r[f"{prefix}ScalableTarget"]
    assert target["ResourceId"] == f"service/<Cluster>/<{service}.Name>"
    assert (target["MinCapacity"], target["MaxCapacity"]) == ("0", "9")
    assert "DesiredCount" not in r[service]  # defect 3: an update must not reset the fleet

    policies = {
        name: policy
        for name, policy in stack.of_type("AWS::ApplicationAutoScaling::ScalingPolicy").items()
        if policy["ScalingTargetId"] == Ref(f"{prefix}ScalableTarget")
    }
    assert sorted(p["PolicyType"] for p in policies.values()) == [
        "StepScaling",
        "TargetTrackingScaling",
    ]
    tracking = r[f"{prefix}BacklogPolicy"]["TargetTrackingScalingPolicyConfiguration"]
    expression, metrics = _metric_math(tracking["CustomizedMetricSpecification"]["Metrics"])
    assert metrics == _service_metrics(service)
    per_task = float(tracking["TargetValue"])

    def one_upload(tasks: int) -> tuple[int, int]:
        return (0, 1) if tasks else (1, 0)

    assert _simulate(expression, per_task, 0, 9, 1, one_upload) == 1
    assert _simulate(expression, per_task, 0, 9, 1, lambda _: (0, 1)) == 1  # a trickle
    backlog = int(per_task * 5)
    assert _simulate(expression, per_task, 0, 9, 1, lambda _: (backlog, 0)) == 5
    assert _simulate(expression, per_task, 0, 9, 1, lambda _: (10_000, 0)) == 9
    assert _simulate(expression, per_task, 0, 9, 4, lambda _: (0, 0)) == 0

    # The step: fires only while pairs wait and no task is wanted, and sets exactly one task.
    alarm = r[f"{prefix}StartAlarm"]
    start_expression, start_metrics = _metric_math(alarm["Metrics"])
    assert start_metrics == {k: v for k, v in _service_metrics(service).items() if k != "inhand"}
    threshold = float(alarm["Threshold"])
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"

    def fires(waiting: float, tasks: float | None) -> bool:
        return _evaluate(start_expression, waiting=waiting, tasks=tasks) >= threshold

    assert fires(1, 0) and fires(50, None)  # no data while the service has no tasks
    assert not fires(0, 0) and not fires(50, 1) and not fires(50, 3)
    step = r[f"{prefix}StartPolicy"]
    assert alarm["AlarmActions"] == [Ref(f"{prefix}StartPolicy")]
    config = step["StepScalingPolicyConfiguration"]
    assert config["AdjustmentType"] == "ExactCapacity"
    assert [s["ScalingAdjustment"] for s in config["StepAdjustments"]] == [1]


@pytest.mark.parametrize("deployment", ["gpu", "fargate+vllm"])
def test_deploys_never_cut_pairs_and_the_stack_can_be_deleted(
    template: dict[str, Any], deployment: str
) -> None:
    """Defects 2 and 3: rolling deploys start new tasks before stopping old ones; a stopping
    task (deploy, scale-in, instance draining) keeps its stop timeout; and no scale-in
    protection survives the capacity provider, so deleting the stack cannot wait forever."""
    stack = _deployed(template, deployment)
    r = stack.resources
    for service in [n for n in ("WorkerService", "EngineService") if n in r]:
        deploy = r[service]["DeploymentConfiguration"]
        assert deploy["MinimumHealthyPercent"] >= 100, service
        assert deploy["MaximumPercent"] >= 200, service
        assert deploy["DeploymentCircuitBreaker"] == {"Enable": True, "Rollback": True}
    group = r["AutoScalingGroup"]
    provider = r["CapacityProvider"]["AutoScalingGroupProvider"]
    protected = group.get("NewInstancesProtectedFromScaleIn") is True
    assert not protected and provider["ManagedTerminationProtection"] == "DISABLED"
    assert provider["ManagedDraining"] == "ENABLED"
    # Room for a deploy's new tasks next to the old ones.
    most_tasks = int(stack.params["MaxWorkers" if deployment == "gpu" else "MaxEngineTasks"])
    assert int(group["MaxSize"]) >= 2 * most_tasks


def test_lambda_consumes_the_queue_without_throttled_receives(template: dict[str, Any]) -> None:
    """Defect 5: reserved concurrency covers the mapping's maximum, so the poller is never
    throttled and no good pair walks to the DLQ on throttles."""
    r = _deployed(template, "lambda").resources
    mapping = r["FunctionQueueMapping"]
    assert mapping["EventSourceArn"] == GetAtt("JobQueue", "Arn")
    assert mapping["FunctionName"] == Ref("Function")
    assert mapping["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    maximum = int(mapping["ScalingConfig"]["MaximumConcurrency"])
    assert maximum >= 2
    function = r["Function"]
    assert int(function["ReservedConcurrentExecutions"]) >= maximum
    assert function["PackageType"] == "Image"
    assert function["Architectures"] == ["x86_64"]
    assert "VpcConfig" not in function
    assert function["Environment"]["Variables"]["PAIRWATCH_COMPARATOR"] == "metrics"
    assert function["LoggingConfig"]["LogGroup"] == Ref("FunctionLogGroup")
    assert not any(t.startswith(("AWS::ECS", "AWS::AutoScaling")) for t in _types(r))


def _types(resources: dict[str, dict[str, Any]]) -> set[str]:
    return {resource["Type"] for resource in resources.values()}


# ------------------------------------------------------------------ GPU AMI and CUDA


def _cuda_of(dockerfile: Path) -> str:
    bases = [args.split()[0] for op, args in _instructions(dockerfile) if op == "FROM"]
    (version,) = {re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-base-\S+", b).group(1) for b in bases}  # type: ignore[union-attr]
    return version


def test_gpu_ami_is_looked_up_only_where_gpu_instances_exist(template: dict[str, Any]) -> None:
    """Defect 7: no SSM-typed parameter (CloudFormation resolves those for every stack); the
    AMI's dynamic reference sits in the launch template, which CPU-only stacks do not have."""
    for name, spec in template["Parameters"].items():
        assert not spec["Type"].startswith("AWS::SSM::"), name
    for deployment in DEPLOYMENTS:
        stack = _deployed(template, deployment)
        text = json.dumps(stack.resources, default=repr)
        gpu = deployment == "gpu" or "vllm" in deployment
        assert ("{{resolve:ssm:" in text) == gpu, deployment
        if gpu:
            image_id = stack.resources["LaunchTemplate"]["LaunchTemplateData"]["ImageId"]
            assert image_id == "{{resolve:ssm:" + stack.params["GpuAmiParameter"] + "}}"


def test_cuda_of_the_images_matches_the_pinned_ami_driver(template: dict[str, Any]) -> None:
    """Defect 7: the GPU image's CUDA base is the CUDA of the pinned torch wheels, and the
    pinned AMI's driver runs it and the pinned vLLM image."""
    parameter = template["Parameters"]["GpuAmiParameter"]["Default"]
    assert "/recommended" not in parameter, "pin an AMI release, not the moving recommendation"
    (ami,) = re.findall(r"/gpu/([^/]+)/image_id$", parameter)
    driver = PINNED_AMI_DRIVER[ami]
    base_cuda = _cuda_of(GPU_DOCKERFILE)
    assert torch.version.cuda is not None
    assert base_cuda == ".".join(torch.version.cuda.split(".")[:2]), "torch wheels' CUDA"
    engine_tag = template["Parameters"]["EngineImage"]["Default"].rpartition(":")[2]
    for cuda in (base_cuda, VLLM_IMAGE_CUDA[engine_tag]):
        assert driver >= CUDA_MIN_DRIVER[cuda], (cuda, driver)
    assert f"{driver[0]}.{driver[1]}" in template["Parameters"]["GpuAmiParameter"]["Description"]


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


def _pip_installs(path: Path) -> list[list[str]]:
    """The arguments of every ``pip install`` in the Dockerfile."""
    runs = " && ".join(args for op, args in _instructions(path) if op == "RUN")
    return [
        shlex.split(part.split("pip install", 1)[1])
        for part in runs.split("&&")
        if "pip install" in part
    ]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.stem)
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


def test_only_the_gpu_image_installs_torch_and_with_cis_pins() -> None:
    """Issue 12: torch is the `vl` extra; the Lambda and CPU images install the core only."""
    pins = set(re.findall(r"\b(torch(?:vision)?==[\w.+]+)", (ROOT / ".ci" / "run").read_text()))
    assert pins
    gpu = _pip_installs(GPU_DOCKERFILE)
    project = [args for args in gpu if any(a.startswith("/src") for a in args)]
    (project_args,) = project
    assert "/src[vl]" in project_args and pins <= set(project_args)
    assert all(pins <= set(args) for args in gpu), (
        "every install pins torch (an extra may not move it)"
    )
    for path in TORCHLESS_DOCKERFILES:
        installs = _pip_installs(path)
        assert installs, path.name
        for args in installs:
            assert not any("torch" in a or "[vl]" in a or "pytorch.org" in a for a in args), path
        (project_args,) = installs
        assert project_args[-1] in {"/src", "/tmp/src"}, path.name  # the core: no extra


def _uid(path: Path) -> int:
    users = [args for op, args in _final_stage(path) if op == "USER"]
    assert users, f"{path.name} must switch to a non-root user"
    uid = int(users[-1].split(":")[0])
    assert uid != 0
    return uid


@pytest.mark.parametrize("path", [GPU_DOCKERFILE, CPU_DOCKERFILE], ids=lambda p: p.stem)
def test_pairwatch_images_run_pairwatch_as_a_non_root_user(path: Path) -> None:
    stage = _final_stage(path)
    assert _uid(path) == 10001
    entrypoint = [_exec_form(args) for op, args in stage if op == "ENTRYPOINT"]
    assert entrypoint == [["pairwatch"]]


def test_gpu_image_cache_volume_matches_the_instances_folder(
    template: dict[str, Any], compose: dict[str, Any]
) -> None:
    stage = _final_stage(GPU_DOCKERFILE)
    uid = _uid(GPU_DOCKERFILE)
    env = " ".join(args for op, args in stage if op == "ENV")
    assert "HF_HOME=/cache/" in env
    assert [_exec_form(args) for op, args in stage if op == "VOLUME"] == [["/cache"]]

    # The ECS host folder behind /cache is created for that uid (Docker would make it root's).
    resources = _deployed(template, "gpu").resources
    user_data = resources["LaunchTemplate"]["LaunchTemplateData"]["UserData"]
    (host_path,) = (v["Host"]["SourcePath"] for v in resources["WorkerTaskDefinition"]["Volumes"])
    assert f"install -d -o {uid} -g {uid}" in user_data and host_path in user_data
    assert {m["ContainerPath"] for m in _ecs_container(resources)["MountPoints"]} == {"/cache"}
    assert "model-cache:/cache" in compose["services"]["worker-gpu"]["volumes"]


def test_lambda_image_runs_the_lambda_handler() -> None:
    stage = _final_stage(LAMBDA_DOCKERFILE)
    (cmd,) = [_exec_form(args) for op, args in stage if op == "CMD"]
    assert cmd == ["handler.app.lambda_handler"]
    module_name, attribute = cmd[0].rsplit(".", 1)
    assert callable(getattr(importlib.import_module(module_name), attribute))
    env = " ".join(args for op, args in stage if op == "ENV")
    assert "PAIRWATCH_COMPARATOR=metrics" in env


def _documented_builds() -> dict[str, list[str]]:
    """Every ``docker build`` command written in infra/ (README, Dockerfiles, scripts)."""
    builds: dict[str, list[str]] = {}
    for path in sorted(INFRA.rglob("*")):
        if not path.is_file() or path.suffix == ".dockerignore":
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"docker (buildx )?build ", line):
                command = line.lstrip("#").strip()
                builds[f"{path.relative_to(INFRA)}:{number}"] = shlex.split(command)
    return builds


def test_every_documented_build_makes_a_single_amd64_manifest(template: dict[str, Any]) -> None:
    """Defect 1: Lambda refuses a multi-entry OCI index (provenance attestations), and the
    template pins x86_64."""
    builds = _documented_builds()
    assert {where.split(":")[0] for where in builds} >= {
        "README.md",
        *(f"docker/{p.name}" for p in DOCKERFILES),
    }
    for where, argv in builds.items():
        assert "--provenance=false" in argv, where
        assert argv[argv.index("--platform") + 1] == "linux/amd64", where
    function = _deployed(template, "lambda").resources["Function"]
    assert function["Architectures"] == ["x86_64"]


# ------------------------------------------------------------------ commands and settings


def _container_commands(template: dict[str, Any], compose: dict[str, Any]) -> dict[str, list[str]]:
    """Every ``pairwatch`` argv a container runs, by where it is configured."""
    container = _ecs_container(_deployed(template, "gpu").resources)
    commands = {
        "ecs worker": [
            FAKE_QUEUE_URL if arg == Ref("JobQueue") else arg for arg in container["Command"]
        ]
    }
    pairwatch_images = {f"infra/docker/{p.name}" for p in (GPU_DOCKERFILE, CPU_DOCKERFILE)}
    for name, service in compose["services"].items():
        if service.get("build", {}).get("dockerfile") in pairwatch_images:
            commands[f"compose {name}"] = [str(arg) for arg in service["command"]]
    for path in (GPU_DOCKERFILE, CPU_DOCKERFILE):
        stage = _final_stage(path)
        commands[f"{path.stem} CMD"] = [
            arg for op, args in stage if op == "CMD" for arg in _exec_form(args)
        ]
    return commands


def test_every_container_command_exists_in_the_cli(
    template: dict[str, Any], compose: dict[str, Any]
) -> None:
    commands = _container_commands(template, compose)
    expected = {
        "ecs worker": "watch-sqs",
        "compose worker": "watch-minio",
        "compose worker-gpu": "watch-minio",
        "compose worker-engine": "watch-minio",
        "compose pairwatch": "serve",
    }
    assert set(expected) | {"gpu CMD", "cpu CMD"} == set(commands)
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
    found: dict[str, dict[str, str]] = {
        deployment: _worker_environment(_deployed(template, deployment))
        for deployment in DEPLOYMENTS
    }
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        found[f"compose {name}"] = {k: _compose_value(v) for k, v in env.items()}
    for path in DOCKERFILES:
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
    if hasattr(got, "get_secret_value"):
        got = got.get_secret_value()
    if isinstance(got, list):  # a comma-separated list (allowed_buckets)
        return got == [part.strip() for part in value.split(",")]
    if isinstance(got, bool):
        return got == (value.lower() in {"1", "true", "yes", "on"})
    if isinstance(got, int | float):
        return float(got) == float(value)
    return str(got) == value


@pytest.mark.parametrize("deployment", DEPLOYMENTS)
def test_workers_take_events_for_the_stacks_bucket_only(
    template: dict[str, Any], deployment: str
) -> None:
    """A message naming another bucket is refused before any request (issue 19)."""
    stack = Stack(template, **(DEPLOYMENTS[deployment] | {"BucketName": "stack-bucket"}))
    assert _worker_environment(stack)["PAIRWATCH_ALLOWED_BUCKETS"] == "stack-bucket"


def test_compose_consumers_take_events_for_the_created_bucket_only(
    compose: dict[str, Any],
) -> None:
    script = " ".join(map(str, compose["services"]["setup"]["command"]))
    created = re.search(r"mc mb --ignore-existing local/([\w.-]+)", script)
    assert created is not None
    consumers = [
        s for s in compose["services"].values() if s.get("command", [""])[0] in ("watch", "serve")
    ]
    assert len(consumers) == 4  # one per profile
    for service in consumers:
        assert service["environment"]["PAIRWATCH_ALLOWED_BUCKETS"] == created.group(1)
        for part in service["command"]:
            if str(part).startswith("s3://"):
                assert str(part).removeprefix("s3://").split("/")[0] == created.group(1)


def test_every_pairwatch_variable_is_a_valid_setting(
    template: dict[str, Any], compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    environments = _pairwatch_environment(template, compose)
    assert all(environments[deployment] for deployment in DEPLOYMENTS)
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


def _webhook_script(compose: dict[str, Any]) -> str:
    script: str = compose["services"]["webhook-setup"]["command"][0]
    return script


def test_compose_pins_images_and_publishes_only_on_loopback(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if "image" in service and "build" not in service:
            tag = service["image"].rpartition(":")[2]
            assert re.search(r"\d", tag) and tag != "latest", f"{name}: unpinned image"
        if "build" in service:
            assert (COMPOSE.parent / service["build"]["context"]).resolve() == ROOT
            assert (ROOT / service["build"]["dockerfile"]).is_file()
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert "ports" not in services["vllm"], "only the worker talks to the engine"
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"].startswith(
        "${MINIO_ROOT_PASSWORD:?"
    ), "no password committed to the repository"


def test_compose_runs_one_consumer_per_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    (bucket,) = re.findall(r"mc mb --ignore-existing local/(\S+)", services["setup"]["command"][0])
    workers = ("worker", "worker-gpu", "worker-engine")
    assert {services[name]["command"][-1] for name in workers} == {f"s3://{bucket}/incoming/"}
    consumers = (*workers, "pairwatch")
    assert len({tuple(services[name]["profiles"]) for name in consumers}) == len(consumers)
    output_prefix = services["pairwatch"]["environment"]["PAIRWATCH_OUTPUT_PREFIX"]
    for name in consumers:
        assert services[name]["environment"]["PAIRWATCH_OUTPUT_PREFIX"] == output_prefix
    # The CPU consumers run the torch-less image; only the in-worker model needs the GPU one.
    for name in ("worker", "worker-engine", "pairwatch"):
        assert services[name]["build"]["dockerfile"] == "infra/docker/cpu.Dockerfile", name
    assert services["worker-gpu"]["build"]["dockerfile"] == "infra/docker/gpu.Dockerfile"


def test_compose_engine_profile_wires_the_worker_to_vllm(compose: dict[str, Any]) -> None:
    services = compose["services"]
    vllm, worker = services["vllm"], services["worker-engine"]
    assert vllm["profiles"] == worker["profiles"] == ["engine"]
    assert vllm["image"].startswith("vllm/vllm-openai:v")
    env = worker["environment"]
    flags = _vllm_flags([str(a) for a in vllm["command"]])
    assert env["PAIRWATCH_VL_ENDPOINT"] == f"http://vllm:{flags['--port']}/v1"
    assert (env["PAIRWATCH_COMPARATOR"], env["PAIRWATCH_VL_BACKEND"]) == ("vl", "openai")
    assert env["PAIRWATCH_MODEL"] == flags["--served-model-name"]
    assert worker["depends_on"]["vllm"] == {"condition": "service_healthy"}
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
    (gpu,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"]


def test_compose_webhook_posts_to_pairwatch_serve_with_its_token(compose: dict[str, Any]) -> None:
    services = compose["services"]
    serve = services["pairwatch"]
    argv = [str(a) for a in serve["command"]]
    assert argv[0] == "serve"
    flags = dict(itertools.pairwise(argv[1:]))
    assert flags["--host"] == "0.0.0.0"
    port = flags["--port"]
    assert f"127.0.0.1:{port}:{port}" in serve["ports"]
    assert f"127.0.0.1:{port}/readyz" in " ".join(serve["healthcheck"]["test"])
    # The token is taken from the operator's environment, never written here.
    token = serve["environment"]["PAIRWATCH_EVENTS_TOKEN"]
    assert token.startswith("${PAIRWATCH_EVENTS_TOKEN:?")
    setup = services["webhook-setup"]
    assert setup["environment"]["PAIRWATCH_EVENTS_TOKEN"] == token
    assert setup["depends_on"]["pairwatch"] == {"condition": "service_healthy"}

    script = _webhook_script(compose)
    (endpoint,) = re.findall(r"endpoint=(\S+)", script)
    assert endpoint == f"http://pairwatch:{port}/v1/events"
    (auth,) = re.findall(r"auth_token=(\S+)", script)
    assert auth == '"$$PAIRWATCH_EVENTS_TOKEN"'  # $$: compose leaves $ to the shell
    assert "queue_dir=/events" in script

    # Every suffix written out, none matching an output.
    (suffix_list,) = re.findall(r"for suffix in ([^;]+); do", script)
    assert set(suffix_list.split()) == EXPECTED_SUFFIXES
    (event_add,) = [line.split() for line in script.splitlines() if "mc event add" in line]
    words = dict(itertools.pairwise(event_add))  # each word -> the next one
    assert words["--event"] == "put" and words["--suffix"] == '"$$suffix"'
    (bucket,) = re.findall(r"mc mb --ignore-existing local/(\S+)", services["setup"]["command"][0])
    assert f"local/{bucket}" in event_add
    assert words["--prefix"] == "incoming/"
    (target,) = re.findall(r"notify_webhook:(\w+)", script)
    assert f"arn:minio:sqs::{target}:webhook" in event_add
    output_prefix = serve["environment"]["PAIRWATCH_OUTPUT_PREFIX"]
    rules = [(words["--prefix"], suffix) for suffix in EXPECTED_SUFFIXES]
    # Both the webhook and `watch minio s3://BUCKET/incoming/` work relative to that prefix.
    storage = S3Storage(None, bucket, "incoming/", output_prefix=output_prefix)  # type: ignore[arg-type]
    for name in OUTPUT_NAMES:
        _, key = storage.location(name)
        assert not _notified(rules, key), key


def test_infra_readme_shows_kubernetes_probes_for_serve() -> None:
    """Issue 14: liveness on /healthz, readiness on /readyz, in a manifest that parses."""
    text = INFRA_README.read_text(encoding="utf-8")
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S)]
    containers = [
        c
        for b in blocks
        if isinstance(b, dict) and b.get("kind") == "Deployment"
        for c in b["spec"]["template"]["spec"]["containers"]
    ]
    (container,) = containers
    assert container["args"][:1] == ["serve"]
    port = int(container["args"][container["args"].index("--port") + 1])
    probes = {
        kind: (container[kind]["httpGet"]["path"], container[kind]["httpGet"]["port"])
        for kind in ("livenessProbe", "readinessProbe")
    }
    assert probes == {"livenessProbe": ("/healthz", port), "readinessProbe": ("/readyz", port)}
    names = {item["name"] for item in container["env"]}
    assert "PAIRWATCH_EVENTS_TOKEN_FILE" in names or "PAIRWATCH_EVENTS_TOKEN" in names


# ------------------------------------------------------------------ the stack, deployed on moto


@pytest.mark.slow
def test_deployed_stack_compares_a_pair_and_its_outputs_notify_nothing(
    template: dict[str, Any],
) -> None:
    """Deploy the GPU stack on moto (standing in for AWS, which CI cannot reach), then run the
    task definition's own command and environment as a subprocess against it.

    Where moto falls short, and what stands in: its CloudFormation creates the bucket but not the
    bucket's notification rules, so the template's own rules are applied with the S3 API; it
    skips the queue policy, capacity provider, scaling and alarms (checked statically above)
    and resolves no dynamic reference (the GPU AMI's);
    it enforces no IAM (the grants are checked above); and there is no GPU here, so the task's
    ``vl`` comparator is swapped for ``metrics``: the comparator is not what is under test.
    """
    with moto_server() as endpoint:
        ec2, cfn = client("ec2", endpoint), client("cloudformation", endpoint)
        s3, sqs = client("s3", endpoint), client("sqs", endpoint)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
        bucket = unique("pairwatch")
        parameters = {"BucketName": bucket, "ImageTag": "gpu-test"}
        parameters |= {"Worker": "gpu", "VpcId": vpc, "SubnetIds": subnet}
        outputs = _create_stack(cfn, template, bucket, parameters)
        queue_url, dlq_url = outputs["QueueUrl"], outputs["DeadLetterQueueUrl"]
        attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])
        queue_arn = attributes["Attributes"]["QueueArn"]
        redrive = json.loads(attributes["Attributes"]["RedrivePolicy"])
        assert redrive["maxReceiveCount"] == 5

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
        # moto leaves an `!If [..., item, !Ref AWS::NoValue]` list item as None, CloudFormation
        # drops it.
        env = {item["name"]: item["value"] for item in container["environment"] if item}
        assert env == _ecs_environment(Stack(template, **parameters).resources)
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


def _create_stack(
    cfn: Any, template: dict[str, Any], name: str, parameters: dict[str, str]
) -> dict[str, str]:
    """Create the stack on moto and return its outputs."""
    with warnings.catch_warnings():  # moto skips, with a warning, what it cannot create
        warnings.simplefilter("ignore", UserWarning)
        cfn.create_stack(
            StackName=name,
            # As JSON: moto's YAML loader misreads the short form `!Condition NAME` inside
            # `!Or`, which CloudFormation itself accepts.
            TemplateBody=json.dumps(template),
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            Capabilities=["CAPABILITY_IAM"],
        )
    (stack,) = cfn.describe_stacks(StackName=name)["Stacks"]
    assert stack["StackStatus"] == "CREATE_COMPLETE"
    return {o["OutputKey"]: o["OutputValue"] for o in stack["Outputs"]}


def _queued(sqs: Any, queue_url: str) -> int:
    names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
    found = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=names)["Attributes"]
    return sum(int(found[name]) for name in names)


def _drain(sqs: Any, queue_url: str) -> None:
    while messages := sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0).get("Messages"):
        for message in messages:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Tried to parse:UserWarning")  # moto skips what it lacks
def test_deployed_engine_stacks_wire_workers_to_an_internal_load_balancer(
    template: dict[str, Any],
) -> None:
    """Deploy both engine options on moto (standing in for AWS) and read back what was created:
    the workers' endpoint is the load balancer moto made, which is internal and admits only the
    workers' security group. moto does not run the containers (that needs a GPU and vLLM); the
    static tests above check the engine's own flags."""
    with moto_server() as endpoint:
        ec2, cfn = client("ec2", endpoint), client("cloudformation", endpoint)
        elb, ecs = client("elbv2", endpoint), client("ecs", endpoint)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24", AvailabilityZone=zone)[
                "Subnet"
            ]["SubnetId"]
            for i, zone in enumerate(("us-east-1a", "us-east-1b"), 1)
        ]
        for worker in ("fargate", "lambda"):
            name = unique(f"pw-{worker}")
            parameters = {"BucketName": name, "ImageTag": "t", "Worker": worker}
            parameters |= {"Engine": "vllm", "ProcessingTimeout": "60"}
            parameters |= {"VpcId": vpc, "SubnetIds": ",".join(subnets)}
            outputs = _create_stack(cfn, template, name, parameters)
            physical = {
                r["LogicalResourceId"]: r["PhysicalResourceId"]
                for r in cfn.list_stack_resources(StackName=name)["StackResourceSummaries"]
            }

            (lb,) = elb.describe_load_balancers(LoadBalancerArns=[physical["EngineLoadBalancer"]])[
                "LoadBalancers"
            ]
            assert lb["Scheme"] == "internal"
            assert outputs["EngineEndpoint"] == f"http://{lb['DNSName']}/v1"
            if worker == "fargate":
                definition = ecs.describe_task_definition(
                    taskDefinition=physical["WorkerTaskDefinition"]
                )["taskDefinition"]
                (container,) = definition["containerDefinitions"]
                env = {i["name"]: i["value"] for i in container["environment"] if i}
            else:
                function = client("lambda", endpoint).get_function_configuration(
                    FunctionName=physical["Function"]
                )
                env = function["Environment"]["Variables"]
                assert function["VpcConfig"]["SecurityGroupIds"] == [
                    physical["WorkerSecurityGroup"]
                ]
            assert env["PAIRWATCH_VL_ENDPOINT"] == outputs["EngineEndpoint"]
            assert env["PAIRWATCH_VL_BACKEND"] == "openai"

            # Who may reach the load balancer and the engine: groups, never address ranges.
            groups = {
                g["GroupId"]: g
                for g in ec2.describe_security_groups(
                    Filters=[{"Name": "vpc-id", "Values": [vpc]}]
                )["SecurityGroups"]
            }
            lb_group = groups[physical["EngineLoadBalancerSecurityGroup"]]
            assert lb["SecurityGroups"] == [lb_group["GroupId"]]
            sources = {
                pair["GroupId"]
                for permission in lb_group["IpPermissions"]
                for pair in permission["UserIdGroupPairs"]
            }
            assert sources == {physical["WorkerSecurityGroup"]}
            for group in groups.values():
                for permission in group["IpPermissions"]:
                    assert not permission.get("IpRanges"), group["GroupId"]
            (target_group,) = elb.describe_target_groups(
                LoadBalancerArn=physical["EngineLoadBalancer"]
            )["TargetGroups"]
            assert (target_group["Port"], target_group["HealthCheckPath"]) == (8000, "/health")
