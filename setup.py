from setuptools import setup

setup(
    name="openaigw",
    version="0.1.0",
    description="An OpenAI API gateway built on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=["openaigw", "openaigw.admin", "openaigw.cache", "openaigw.plugins", "twisted.plugins"],
    package_data={"twisted": ["plugins/openaigw_plugin.py"]},
    entry_points={"console_scripts": ["openaigw-keygen = openaigw.keygen:main"]},
    install_requires=[
        "Twisted>=22.4",
        "pyOpenSSL>=23.0",
        "service-identity>=18.1",
        "zope.interface>=5.5",
        "prometheus-client>=0.16",
        "hiredis>=1.0",
        "treq>=22.2",
    ],
)
