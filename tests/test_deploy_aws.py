"""deploy/aws: the CloudFormation template passes cfn-lint and says what we claim."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

AWS = Path(__file__).resolve().parent.parent / "deploy" / "aws"
TEMPLATE = AWS / "template.yaml"
HANDLER = "spirtd.functions.gradient.handler"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    # Long-form intrinsics (Fn::Sub, Ref) only, so plain YAML can read it.
    return yaml.safe_load(TEMPLATE.read_text())


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    try:
        import cfnlint  # noqa: F401
    except ImportError:
        pytest.fail("cfn-lint is not installed; it is in the test extras: pip install -e '.[test]'")
    # cfn-lint's console entry point, run with this interpreter (no PATH lookup).
    code = "import sys; from cfnlint.runner import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=240
    )


def test_cfn_lint_passes() -> None:
    proc = cfn_lint(TEMPLATE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_cfn_lint_catches_a_broken_template(tmp_path: Path) -> None:
    # Guards against a lint run that passes whatever it is given.
    broken = TEMPLATE.read_text().replace("PackageType: Image", "PackageType: Imagee")
    p = tmp_path / "broken.yaml"
    p.write_text(broken)
    proc = cfn_lint(p)
    assert proc.returncode != 0 and "Imagee" in proc.stdout


def test_function_is_an_image_in_the_vpc(template: dict[str, Any]) -> None:
    fn = template["Resources"]["GradientFunction"]["Properties"]
    assert fn["PackageType"] == "Image"
    assert fn["ImageConfig"]["Command"] == [HANDLER]
    assert fn["VpcConfig"]["SubnetIds"] == {"Ref": "SubnetIds"}
    assert "ReservedConcurrentExecutions" in fn


def test_handler_named_by_template_and_dockerfile_exists(template: dict[str, Any]) -> None:
    module, _, attr = HANDLER.rpartition(".")
    assert callable(getattr(importlib.import_module(module), attr))
    docker = (AWS / "Dockerfile").read_text()
    assert f'CMD ["{HANDLER}"]' in docker
    assert "torch==2.13.0" in docker  # the same pin as pyproject.toml


def test_role_is_least_privilege(template: dict[str, Any]) -> None:
    role = template["Resources"]["FunctionRole"]["Properties"]
    assert "ManagedPolicyArns" not in role
    statements = [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]
    for s in statements:
        actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
        assert s["Effect"] == "Allow"
        assert all("*" not in a for a in actions), actions
        if s["Resource"] == "*":
            # Only the ENI calls Lambda needs for VPC access, which EC2 cannot scope.
            assert all(
                re.fullmatch(
                    r"ec2:\w+NetworkInterfaces?|ec2:DescribeSubnets|"
                    r"ec2:(Un)?[Aa]ssignPrivateIpAddresses",
                    a,
                )
                for a in actions
            )
    secret = [s for s in statements if s["Action"] == "secretsmanager:GetSecretValue"]
    assert secret and secret[0]["Resource"] == {"Ref": "RedisSecretArn"}


def test_the_data_policy_reads_only_the_dataset_prefix(template: dict[str, Any]) -> None:
    """With ``DataBucket`` set, the role may list the bucket under ``DataPrefix`` and
    read objects there: what spirtd/tasks/remote.py calls, nothing else."""
    res = template["Resources"]
    data = res["DataReadPolicy"]
    assert data["Condition"] == "HasData"
    assert data["Properties"]["RoleName"] == {"Ref": "FunctionRole"}
    listing, read = data["Properties"]["PolicyDocument"]["Statement"]
    assert listing["Action"] == "s3:ListBucket"
    assert listing["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:s3:::${DataBucket}"}
    assert listing["Condition"] == {"StringLike": {"s3:prefix": [{"Fn::Sub": "${DataPrefix}/*"}]}}
    assert read["Action"] == "s3:GetObject"
    assert read["Resource"] == {
        "Fn::Sub": "arn:${AWS::Partition}:s3:::${DataBucket}/${DataPrefix}/*"
    }
    egress = res["DataEgress"]
    assert egress["Condition"] == "HasData"
    assert egress["Properties"]["DestinationPrefixListId"] == {"Ref": "S3PrefixListId"}
    assert (egress["Properties"]["FromPort"], egress["Properties"]["ToPort"]) == (443, 443)
    params = template["Parameters"]
    assert re.fullmatch(params["DataBucket"]["AllowedPattern"], "")
    assert re.fullmatch(params["DataBucket"]["AllowedPattern"], "spirt-data")
    assert not re.fullmatch(params["DataPrefix"]["AllowedPattern"], "/datasets/")


def test_egress_only_to_redis_tls_and_secrets(template: dict[str, Any]) -> None:
    res = template["Resources"]
    egress = res["FunctionSecurityGroup"]["Properties"]["SecurityGroupEgress"]
    assert egress == [
        {
            "Description": "Peer Redis over TLS",
            "IpProtocol": "tcp",
            "FromPort": {"Ref": "RedisTlsPort"},
            "ToPort": {"Ref": "RedisTlsPort"},
            "CidrIp": {"Ref": "RedisCidr"},
        }
    ]
    extra = res["SecretsEgress"]["Properties"]
    assert (extra["FromPort"], extra["ToPort"]) == (443, 443)


def test_function_config_binds_the_redis_url_to_its_secret(template: dict[str, Any]) -> None:
    """The Redis and its credentials are the function's configuration; an event names
    neither the secret nor where it is (spirtd/functions/credentials.py)."""
    from spirtd.functions import credentials

    env = template["Resources"]["GradientFunction"]["Properties"]["Environment"]["Variables"]
    text = env[credentials.TARGETS_ENV]["Fn::Sub"]
    url = "rediss://10.0.1.15:6380/0"
    arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:spirt/redis-fn-AbCdEf"
    params = template["Parameters"]
    assert re.fullmatch(params["RedisUrl"]["AllowedPattern"], url)
    assert re.fullmatch(params["RedisSecretArn"]["AllowedPattern"], arn)
    assert not re.fullmatch(params["RedisUrl"]["AllowedPattern"], "redis://10.0.1.15:6379/0")
    doc = text.replace("${RedisUrl}", url).replace("${RedisSecretArn}", arn)
    (binding,) = credentials.configured({credentials.TARGETS_ENV: doc})
    assert binding.url == url
    assert binding.credentials == credentials.CredentialRef("secretsmanager", arn)
