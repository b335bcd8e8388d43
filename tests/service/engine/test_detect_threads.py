"""A detect batch on two threads (issue 12: both cores for dlib): the same answers as one thread.

dlib's detector is not safe to share between threads, its shape predictor is; the backend gives
each thread its own detector. These tests hold the threaded stage to the sequential one on real
photos, and check that the work really ran on the pool's threads.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from photo_truth import DetectQuery, load_photo

from service.engine.batcher import DeadlineExceeded
from service.engine.detect_stage import run_detect_batch
from service.engine.faces import ImageFaces

PHOTOS = ["2007_007763.jpg", "aflw-test.jpg", "2008_001322.jpg", "2008_002079.jpg", "2008_004176.jpg"]


def _same(a: ImageFaces | BaseException, b: ImageFaces | BaseException) -> None:
    if isinstance(a, BaseException) or isinstance(b, BaseException):
        assert type(a) is type(b)
        return
    assert a.skipped_small == b.skipped_small
    assert [f.box for f in a] == [f.box for f in b]
    assert [f.score for f in a] == [f.score for f in b]
    for fa, fb in zip(a, b, strict=True):
        np.testing.assert_array_equal(fa.landmarks, fb.landmarks)


def test_a_batch_on_two_threads_answers_as_on_one(dlib_backend):
    images = [load_photo(name) for name in PHOTOS]
    queries = [DetectQuery(image, min_face_size=20) for image in images]
    queries.append(DetectQuery(images[1], boxes=((60.0, 70.0, 300.0, 300.0),)))  # detect=false
    queries.append(DetectQuery(images[0], deadline=time.monotonic() - 1.0))  # already late
    sequential = run_detect_batch(dlib_backend, queries, 1280, 0.15)
    with ThreadPoolExecutor(2) as pool:
        threaded = run_detect_batch(dlib_backend, queries, 1280, 0.15, pool)
    assert sum(len(r) for r in sequential if isinstance(r, ImageFaces)) >= 8
    assert isinstance(threaded[-1], DeadlineExceeded)
    for a, b in zip(sequential, threaded, strict=True):
        _same(a, b)


def test_the_backend_answers_many_threads_at_once_as_one(dlib_backend):
    """Four threads detecting different photos at the same time, over and over: no detector state
    leaks from one call into another (a shared detector would mix them up)."""
    images = [load_photo(name) for name in PHOTOS[:4]]
    expected = [dlib_backend.detect([image])[0] for image in images]
    start = threading.Barrier(4)

    def work(k: int) -> list[ImageFaces]:
        start.wait()
        return [dlib_backend.detect([images[(k + r) % 4]])[0] for r in range(4)]

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(work, range(4)))
    for k, runs in enumerate(answers):
        for r, found in enumerate(runs):
            _same(found, expected[(k + r) % 4])


def test_a_batch_runs_on_the_pool_threads(dlib_backend):
    """With a pool, the images run on the pool's threads (both of them for a batch of several),
    not one after another on the caller's thread."""
    seen: list[str] = []
    detect = dlib_backend.detect

    class Recording:
        name = dlib_backend.name
        concurrent = True

        def detect(self, images, *, min_face_size=None):
            seen.append(threading.current_thread().name)
            time.sleep(0.05)  # long enough that the second thread takes the next image
            return detect(images, min_face_size=min_face_size)

        def landmarks_for_boxes(self, image, boxes):
            return dlib_backend.landmarks_for_boxes(image, boxes)

    image = load_photo("aflw-test.jpg")
    with ThreadPoolExecutor(2, thread_name_prefix="detect-test") as pool:
        found = run_detect_batch(Recording(), [DetectQuery(image) for _ in range(4)], 1280, 0.0, pool)
    assert all(len(faces) == 1 for faces in found)
    assert len(seen) == 4 and all(name.startswith("detect-test") for name in seen)
    assert len(set(seen)) == 2
