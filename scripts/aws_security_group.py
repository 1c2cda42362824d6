#!/usr/bin/env python3
"""Create the cluster's AWS security group from cluster.yaml, before the first `ray up`.

    python scripts/aws_security_group.py                 # cluster.yaml, the region's default VPC
    python scripts/aws_security_group.py --vpc-id vpc-0abc --config my-cluster.yaml

Why not let `ray up` make it: Ray 2.60's AWS bootstrap adds SSH from 0.0.0.0/0 to every security
group it creates (``_create_default_ssh_inbound_rules``), whatever ``provider.security_group``
says, so the cluster would take SSH from the whole internet. This script creates the group that
``provider.security_group`` describes (its ``GroupName``, its ``IpPermissions``: SSH from your
CIDR), plus one rule for all traffic between the cluster's own nodes, and prints its id. Put the id
in cluster.yaml's ``SecurityGroupIds`` (one anchor, used by every node type): Ray then uses the
group as it is and adds nothing. A group of that name that already exists is checked, not changed.

Refuses IpPermissions open to everyone (0.0.0.0/0, ::/0) and the documentation-range placeholder
cluster.yaml ships with. Needs boto3 and AWS credentials, as `ray up` does.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path
from typing import Any

import yaml

# RFC 5737 documentation ranges: cluster.yaml's placeholder lies in one, and no real client does.
PLACEHOLDER_NETWORKS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")]


class SecurityGroupError(Exception):
    """The config asks for something unsafe, or the existing group is not what it says."""


def ingress_problems(permissions: list[dict[str, Any]]) -> list[str]:
    """Why these IpPermissions may not be applied: open to everyone, a placeholder, not a network."""
    problems = []
    if not permissions:
        problems.append("provider.security_group.IpPermissions is empty: give SSH (port 22) from your CIDR")
    for rule in permissions:
        span = f"-{rule['ToPort']}" if rule.get("ToPort") != rule.get("FromPort") else ""
        ports = f"port {rule.get('FromPort')}{span}"
        cidrs = ([r.get("CidrIp") for r in rule.get("IpRanges", [])]
                 + [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])])
        for cidr in cidrs:
            try:
                network = ipaddress.ip_network(str(cidr), strict=False)
            except ValueError:
                problems.append(f"{ports}: {cidr!r} is not a CIDR such as 198.18.7.21/32")
                continue
            if network.prefixlen == 0:
                problems.append(f"{ports}: {cidr} opens it to the whole internet")
            elif any(network.subnet_of(p) for p in PLACEHOLDER_NETWORKS if p.version == network.version):
                problems.append(f"{ports}: {cidr} is cluster.yaml's placeholder; set your own network, e.g. "
                                f"$(curl -s https://checkip.amazonaws.com)/32")
    return problems


def _self_rule(group_id: str) -> dict[str, Any]:
    """All traffic between the cluster's nodes (GCS, object store, workers), as Ray's own rule."""
    return {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id, "Description": "ray-wsss nodes"}]}


def ensure_group(config: dict[str, Any], vpc_id: str | None = None, ec2=None) -> str:
    """The id of the group cluster.yaml's provider.security_group describes, created if missing."""
    provider = config["provider"]
    wanted = provider.get("security_group") or {}
    name, permissions = wanted.get("GroupName"), wanted.get("IpPermissions") or []
    if not name:
        raise SecurityGroupError("cluster.yaml has no provider.security_group.GroupName")
    problems = ingress_problems(permissions)
    if problems:
        raise SecurityGroupError("provider.security_group.IpPermissions: " + "; ".join(problems))
    if ec2 is None:
        import boto3

        ec2 = boto3.client("ec2", region_name=provider["region"])
    vpc_id = vpc_id or _default_vpc(ec2, provider["region"])
    found = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]},
                                                  {"Name": "vpc-id", "Values": [vpc_id]}])["SecurityGroups"]
    if found:
        group = found[0]
        problems = ingress_problems([r for r in group["IpPermissions"] if r.get("IpRanges") or r.get("Ipv6Ranges")])
        if problems:
            raise SecurityGroupError(f"security group {name} ({group['GroupId']}) in {vpc_id} already exists and "
                                     f"is open: {'; '.join(problems)}. Fix or delete it; this script changes no "
                                     f"existing group")
        return group["GroupId"]
    group_id = ec2.create_security_group(
        GroupName=name, VpcId=vpc_id,
        Description="ray-wsss: SSH from the CIDRs in cluster.yaml, all traffic between cluster nodes")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[*permissions, _self_rule(group_id)])
    return group_id


def _default_vpc(ec2, region: str) -> str:
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise SecurityGroupError(f"{region} has no default VPC: pass --vpc-id (and SubnetIds in cluster.yaml)")
    return vpcs[0]["VpcId"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "cluster.yaml"))
    parser.add_argument("--vpc-id", help="VPC for the cluster (default: the region's default VPC)")
    args = parser.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    try:
        group_id = ensure_group(config, args.vpc_id)
    except SecurityGroupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"security group {config['provider']['security_group']['GroupName']}: {group_id}\n"
          f"set it in {args.config}:  SecurityGroupIds: &cluster_security_group [{group_id}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
