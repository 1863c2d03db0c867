"""Face boxes (filters/faces.py): nudenet's face classes above the score cut, its
[x, y, w, h] boxes as [x0, y0, x1, y1]; OpenCV's cascade with its settings pinned on a
real photograph."""




def test_nudenet_faces_keep_face_classes_over_the_cut_as_corner_boxes():
    from mmloom.filters.faces import NudeNetFaces

    class Stub:  # NudeNetFaces reads only the version of the detector it is given
        version = "nudenet"

    faces = NudeNetFaces(Stub())
    dets = [[
        {"class": "FACE_FEMALE", "score": 0.9, "box": [10, 20, 30, 40]},
        {"class": "FACE_MALE", "score": 0.4, "box": [5, 6, 7, 8]},         # at the cut: kept
        {"class": "FACE_MALE", "score": 0.39, "box": [50, 60, 70, 80]},    # under it
        {"class": "BUTTOCKS_EXPOSED", "score": 0.95, "box": [1, 2, 3, 4]},  # not a face
    ], []]
    assert faces(None, dets) == [[[10, 20, 40, 60], [5, 6, 12, 14]], []]


def test_opencv_faces_on_a_real_photograph(pics):
    from mmloom.filters.faces import OpenCvFaces

    found = OpenCvFaces()([pics["astronaut.jpg"], pics["coffee.jpg"]])
    assert [len(b) for b in found] == [1, 0]
    import cv2
    import numpy as np

    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    grey = np.asarray(pics["astronaut.jpg"].convert("L"))
    (x, y, w, h), = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    assert found[0] == [[int(x), int(y), int(x + w), int(y + h)]]  # the documented settings, corners from [x, y, w, h]
