"""A small CloudFormation evaluator for template tests: the stack CloudFormation would build for
one set of parameter values, with intrinsic functions resolved.

It evaluates only the functions infra/aws/template.yaml uses and fails loudly on anything else,
so a template change that it cannot follow breaks the tests instead of passing unchecked.
``Ref`` and ``Fn::GetAtt`` of resources stay symbolic (``Ref("JobQueue")``), which is what the
wiring tests compare against. ``Rules`` are evaluated too: ``violations()`` lists the assertion
descriptions CloudFormation would fail the deployment with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfnlint.decode import decode_str


@dataclass(frozen=True)
class Ref:
    """``!Ref`` of a resource (parameters resolve to their values)."""

    name: str


@dataclass(frozen=True)
class GetAtt:
    name: str
    attribute: str


NO_VALUE = object()
PSEUDO = {
    "AWS::Partition": "aws",
    "AWS::Region": "us-east-1",
    "AWS::AccountId": "123456789012",
    "AWS::StackName": "pairwatch",
    "AWS::URLSuffix": "amazonaws.com",
}
#: Values for parameters without a default, so that a stack can be built with no arguments.
REQUIRED_EXAMPLES = {"BucketName": "example-bucket", "ImageTag": "0.1.0"}


def load_template(path: Path) -> dict[str, Any]:
    """The template parsed the way cfn-lint parses it (short-form tags become ``Fn::`` keys)."""
    decoded, errors = decode_str(path.read_text(encoding="utf-8"))
    assert not errors, errors
    return dict(decoded)


class Stack:
    """The template as CloudFormation would see it for one set of parameter values."""

    def __init__(self, template: dict[str, Any], **overrides: Any) -> None:
        self.template = template
        values: dict[str, Any] = dict(REQUIRED_EXAMPLES)
        values |= {
            name: spec["Default"]
            for name, spec in template["Parameters"].items()
            if "Default" in spec
        }
        values |= overrides
        unknown = set(values) - set(template["Parameters"])
        assert not unknown - set(REQUIRED_EXAMPLES), f"no such parameters: {sorted(unknown)}"
        self.params = {
            name: _param_value(template, name, v)
            for name, v in values.items()
            if name in template["Parameters"]
        }

    # ---------------------------------------------------------------- conditions and rules

    def condition(self, name: str) -> bool:
        return bool(self._condition(self.template["Conditions"][name]))

    def _condition(self, node: Any) -> Any:
        if isinstance(node, dict) and len(node) == 1:
            (fn, arg), *_ = node.items()
            if fn == "Fn::Equals":
                return self.resolve(arg[0]) == self.resolve(arg[1])
            if fn == "Fn::Not":
                return not self._condition(arg[0])
            if fn == "Fn::And":
                return all(self._condition(part) for part in arg)
            if fn == "Fn::Or":
                return any(self._condition(part) for part in arg)
            if fn == "Fn::Contains":
                return self.resolve(arg[1]) in self.resolve(arg[0])
            if fn == "Condition":
                return self.condition(arg)
        return self.resolve(node)

    def violations(self) -> list[str]:
        """``AssertDescription`` of every rule assertion these parameters fail."""
        failed = []
        for rule in self.template.get("Rules", {}).values():
            if "RuleCondition" in rule and not self._condition(rule["RuleCondition"]):
                continue
            for assertion in rule["Assertions"]:
                if not self._condition(assertion["Assert"]):
                    failed.append(assertion["AssertDescription"])
        return failed

    # ---------------------------------------------------------------- intrinsic functions

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
                if fn == "Fn::Join":
                    return str(arg[0]).join(str(part) for part in self.resolve(arg[1]))
                assert not fn.startswith("Fn::"), f"evaluator lacks {fn}"
            resolved = {key: self.resolve(value) for key, value in node.items()}
            return {key: value for key, value in resolved.items() if value is not NO_VALUE}
        if isinstance(node, list):
            items = [self.resolve(item) for item in node]
            return [item for item in items if item is not NO_VALUE]
        return node

    def _ref(self, name: str) -> Any:
        if name == "AWS::NoValue":
            return NO_VALUE
        if name in PSEUDO:
            return PSEUDO[name]
        if name in self.params:
            return self.params[name]
        assert name in self.template["Resources"], f"Ref to unknown {name}"
        assert self.exists(name), f"Ref to {name}, which these parameters do not create"
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

    # ---------------------------------------------------------------- resources

    def exists(self, name: str) -> bool:
        spec = self.template["Resources"][name]
        return "Condition" not in spec or self.condition(spec["Condition"])

    @property
    def resources(self) -> dict[str, dict[str, Any]]:
        """Resources that exist for these parameters, with resolved properties."""
        return {
            name: {"Type": spec["Type"], **self.resolve(spec.get("Properties", {}))}
            for name, spec in self.template["Resources"].items()
            if self.exists(name)
        }

    def of_type(self, type_name: str) -> dict[str, dict[str, Any]]:
        return {n: r for n, r in self.resources.items() if r["Type"] == type_name}


def _param_value(template: dict[str, Any], name: str, value: Any) -> Any:
    if template["Parameters"][name]["Type"] == "CommaDelimitedList":
        return str(value).split(",")
    return str(value)  # CloudFormation hands every parameter over as a string
