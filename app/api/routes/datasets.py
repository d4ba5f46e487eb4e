"""Datasets and their catalogued partitions."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from app.api.deps import READ, ServiceDep
from app.api.problems import PROBLEM_RESPONSES
from app.api.schemas import Dataset, IsoDate, Partition

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=PROBLEM_RESPONSES)


@router.get("", response_model=list[Dataset], dependencies=[READ])
async def list_datasets(service: ServiceDep) -> list[dict]:
    """Configured datasets: columns, rules, aggregations and their lake tables."""
    return service.dataset_list()


@router.get("/{name}/partitions/{partition_date}", response_model=Partition,
            dependencies=[READ])
async def get_partition(name: str, partition_date: IsoDate, service: ServiceDep) -> dict:
    """One partition per layer: rows, lake snapshot, the saga that wrote it, and lineage."""
    return await run_in_threadpool(service.partition, name, partition_date)
